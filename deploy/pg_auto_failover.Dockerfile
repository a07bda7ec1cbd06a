# PostgreSQL 15 with pg_auto_failover (Debian's packages): the same image runs the
# monitor and the data nodes, chosen by the `pg_autoctl create ... --run` command.
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        postgresql-15 postgresql-15-auto-failover pg-auto-failover-cli ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres /var/lib/postgresql/data

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data/pgaf
USER postgres
WORKDIR /var/lib/postgresql
EXPOSE 5432/tcp
# pg_autoctl stops Postgres cleanly on SIGTERM; `create ... --run` resumes an existing
# PGDATA after a restart instead of initialising it again.
STOPSIGNAL SIGTERM
