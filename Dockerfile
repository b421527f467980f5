# The chat server: Python 3.11, FastAPI on uvicorn, PostgreSQL (given by DATABASE_URL).
#
#   docker build -t chat .
#   docker run --rm -p 8000:8000 -e DATABASE_URL=postgresql://chat:chat@db-host:5432/chat chat
#
# docker-compose.yml beside this file runs it with Postgres, a one-shot migration and two workers.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CHAT_HOST=0.0.0.0 \
    CHAT_PORT=8000

# An unprivileged user to run as; the code under /app stays root-owned and read-only to it.
RUN groupadd --system --gid 10001 chat \
 && useradd --system --uid 10001 --gid chat --create-home --home-dir /home/chat --shell /usr/sbin/nologin chat

WORKDIR /app

# Dependencies first, in their own layer, rebuilt only when pyproject.toml changes: hatchling
# needs a README and the package folder to exist, so stand-ins are made and dropped again.
COPY pyproject.toml ./
RUN mkdir chat && touch chat/__init__.py README.md \
 && pip install --no-cache-dir -e . \
 && rm -rf chat README.md

# Then the whole repository, keeping its layout: the app finds its migrations at /app/migrations,
# which an editable install leaves in place (a plain `pip install .` would not).
COPY . .
RUN pip install --no-cache-dir --no-deps -e . \
 && chat --help > /dev/null \
 && test -f /app/migrations/env.py && test -f /app/chat/static/index.html

USER chat

EXPOSE 8000

# `chat serve` migrates first (a no-op when the `migrate` service already did), then serves.
# Without DATABASE_URL it would try an embedded Postgres: always set DATABASE_URL in a container.
CMD ["chat", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
