"""chat: a real-time chat server on FastAPI and PostgreSQL."""
