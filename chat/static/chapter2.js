// FastAPI "WebSockets" chapter, example 2: /items/{item_id}/ws?token=... with dependencies.
'use strict';

var ws = null;

function setState(text) {
    document.getElementById('ws-state').textContent = text;
}

function connect(event) {
    event.preventDefault();
    var itemId = document.getElementById('itemId');
    var token = document.getElementById('token');
    var scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    if (ws) {
        ws.close();
    }
    var socket = new WebSocket(scheme + location.host + '/items/' + encodeURIComponent(itemId.value) +
        '/ws?token=' + encodeURIComponent(token.value));
    var opened = false;
    ws = socket;
    setState('Connecting…');
    socket.onopen = function () {
        opened = true;
        if (ws === socket) setState('Connected.');
    };
    socket.onclose = function (event) {
        if (ws !== socket) return; // replaced by a newer Connect
        setState(opened ? 'Disconnected (code ' + event.code + ').'
            : 'The server refused the connection: the token must be a real one (or sign in first).');
    };
    socket.onmessage = function (event) {
        var messages = document.getElementById('messages');
        var message = document.createElement('li');
        var content = document.createTextNode(event.data);
        message.appendChild(content);
        messages.appendChild(message);
    };
}

function sendMessage(event) {
    event.preventDefault();
    var input = document.getElementById('messageText');
    var text = input.value;
    if (!ws) {
        return;
    }
    var socket = ws;
    if (socket.readyState === WebSocket.CONNECTING) {
        socket.addEventListener('open', function () { socket.send(text); }, { once: true });
    } else if (socket.readyState === WebSocket.OPEN) {
        socket.send(text);
    }
    input.value = '';
}

document.getElementById('connect').addEventListener('click', connect);
document.getElementById('form').addEventListener('submit', sendMessage);
