// FastAPI "WebSockets" chapter, example 1: an echo socket at /ws.
'use strict';

chapter.open('/ws', 'The server refused the connection.');
