# One image for every Substrate process; compose picks the console script per service.
FROM python:3.11-slim
# openssl: compose's certs job makes the demo CA and broker certificate with scripts/certs.sh.
RUN apt-get update && apt-get install -y --no-install-recommends openssl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# The runtime dependencies exactly as uv.lock holds them, in a layer of their own so that a
# change to the code does not install them again. --inexact keeps the installer uv beside them.
COPY pyproject.toml uv.lock README.md ./
COPY scripts/install.sh ./scripts/install.sh
RUN UV_NO_CACHE=1 bash scripts/install.sh /opt/substrate --inexact --no-install-project
COPY common ./common
COPY services ./services
COPY cell_agent ./cell_agent
COPY substratectl ./substratectl
COPY deploy ./deploy
COPY scripts/certs.sh ./scripts/certs.sh
RUN UV_NO_CACHE=1 bash scripts/install.sh /opt/substrate --inexact --no-editable
ENV PATH=/opt/substrate/bin:$PATH
# compose's demo job writes the cells' agent URLs here; a new volume takes this owner.
RUN mkdir /demo /tls && chown nobody /demo /tls
USER nobody
