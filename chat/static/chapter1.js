// FastAPI "WebSockets" chapter, example 1: an echo socket at /ws.
'use strict';

var scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
var ws = new WebSocket(scheme + location.host + '/ws');
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
