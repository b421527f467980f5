// FastAPI "WebSockets" chapter, example 2: /items/{item_id}/ws?token=... with dependencies.
'use strict';

document.getElementById('connect').addEventListener('click', function (event) {
    event.preventDefault();
    var itemId = document.getElementById('itemId').value;
    var token = document.getElementById('token').value;
    chapter.open('/items/' + encodeURIComponent(itemId) + '/ws?token=' + encodeURIComponent(token),
        'The server refused the connection: the token must be a real one (or sign in first).');
});
