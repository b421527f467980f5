// Shared by the three pages of the FastAPI "WebSockets" chapter: one socket at a time, each
// received text appended as a list item (a text node, never HTML), and the form sends.
'use strict';

var chapter = (function () {
    var scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    var current = null;

    function setState(text) {
        var line = document.getElementById('ws-state');
        if (line) line.textContent = text;
    }

    function open(path, refusedText) {
        if (current) current.close();
        var socket = new WebSocket(scheme + location.host + path);
        var opened = false;
        current = socket;
        setState('Connecting…');
        socket.onopen = function () {
            opened = true;
            if (current === socket) setState('Connected.');
        };
        socket.onclose = function (event) {
            if (current !== socket) return; // replaced by a newer connection
            setState(opened ? 'Disconnected (code ' + event.code + ').' : refusedText);
        };
        socket.onmessage = function (event) {
            var message = document.createElement('li');
            message.appendChild(document.createTextNode(event.data));
            document.getElementById('messages').appendChild(message);
        };
    }

    function send(event) {
        event.preventDefault();
        var input = document.getElementById('messageText');
        var text = input.value;
        var socket = current;
        if (!socket) return;
        if (socket.readyState === WebSocket.CONNECTING) {
            socket.addEventListener('open', function () { socket.send(text); }, { once: true });
        } else if (socket.readyState === WebSocket.OPEN) {
            socket.send(text);
        }
        input.value = '';
    }

    document.getElementById('form').addEventListener('submit', send);
    return { open: open };
})();
