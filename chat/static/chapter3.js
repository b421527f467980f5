// FastAPI "WebSockets" chapter, example 3: many clients at /ws/{client_id}, broadcast to all.
'use strict';

var client_id = Date.now();
document.querySelector('#ws-id').textContent = client_id;
var scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
var ws = new WebSocket(scheme + location.host + '/ws/' + client_id);
var opened = false;
function setState(text) {
    document.getElementById('ws-state').textContent = text;
}
ws.onopen = function () {
    opened = true;
    setState('Connected.');
};
ws.onclose = function (event) {
    setState(opened ? 'Disconnected (code ' + event.code + '): reload the page to reconnect.'
        : 'The server refused the connection: sign in on the chat page first, then reload this one.');
};
ws.onmessage = function (event) {
    var messages = document.getElementById('messages');
    var message = document.createElement('li');
    var content = document.createTextNode(event.data);
    message.appendChild(content);
    messages.appendChild(message);
};

function sendMessage(event) {
    event.preventDefault();
    var input = document.getElementById('messageText');
    var text = input.value;
    if (ws.readyState === WebSocket.CONNECTING) {
        ws.addEventListener('open', function () { ws.send(text); }, { once: true });
    } else if (ws.readyState === WebSocket.OPEN) {
        ws.send(text);
    }
    input.value = '';
}

document.getElementById('form').addEventListener('submit', sendMessage);
