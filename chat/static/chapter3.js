// FastAPI "WebSockets" chapter, example 3: many clients at /ws/{client_id}, broadcast to all.
'use strict';

var client_id = Date.now();
document.querySelector('#ws-id').textContent = client_id;
chapter.open('/ws/' + client_id,
    'The server refused the connection: sign in on the chat page first, then reload this one.');
