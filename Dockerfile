# One image for every Substrate process; compose picks the console script per service.
FROM python:3.11-slim
# openssl: compose's certs job makes the demo CA and broker certificate with scripts/certs.sh.
RUN apt-get update && apt-get install -y --no-install-recommends openssl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY services ./services
COPY cell_agent ./cell_agent
COPY substratectl ./substratectl
COPY deploy ./deploy
COPY scripts/certs.sh ./scripts/certs.sh
RUN pip install --no-cache-dir .
# compose's demo job writes the cells' agent URLs here; a new volume takes this owner.
RUN mkdir /demo /tls && chown nobody /demo /tls
USER nobody
