# One complete ackline node: API + worker + SIP gateway (`ackline serve --role all`).
#
# Binds SIP, RTP and HTTP on 0.0.0.0 inside the container. Peers must be told an address
# they can reach, so ACKLINE_SIP_ADVERTISE (or --advertise) is required: without it the
# node refuses to start (exit 2). The RTP range below is what a firewall or `ports:` opens.
FROM python:3.11-slim-bookworm AS build

# gcc builds the native RTP sender (gateway/media/_rtpsend.c); the image's Python has its
# headers. Only the built wheel goes on to the runtime stage, not the compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY api ./api
COPY carriers ./carriers
COPY common ./common
COPY escalation ./escalation
COPY gateway ./gateway
COPY ivr ./ivr
COPY prompts ./prompts
COPY storage ./storage
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng ffmpeg \
    && rm -rf /var/lib/apt/lists/*

# Only the package, built in the first stage (.dockerignore keeps .venv, var/ and secrets out).
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels

# Non-root; its home holds var/ (SQLite when no database is set, audit log, recordings,
# the generated API key) and the prompt cache. Mount a volume there to keep them.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/ackline ackline
USER ackline
WORKDIR /var/lib/ackline

ENV ACKLINE_SIP_HOST=0.0.0.0 \
    ACKLINE_HTTP_HOST=0.0.0.0 \
    ACKLINE_HTTP_PORT=8080 \
    ACKLINE_SIP_PORT=5060 \
    ACKLINE_RTP_PORTS=20000-20999 \
    ACKLINE_PROMPT_CACHE=/var/lib/ackline/prompts \
    PYTHONUNBUFFERED=1

EXPOSE 8080/tcp 5060/udp 5060/tcp 20000-20999/udp

# /readyz: the database (and Redis) answer and the node is not draining.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('ACKLINE_HTTP_PORT', '8080'), timeout=2)"]

# Exec form: ackline is PID 1 and gets SIGTERM itself (turns unready, drains, exits).
CMD ["ackline", "serve", "--role", "all", "--host", "0.0.0.0", "--http-host", "0.0.0.0"]
