# One image for every Substrate process; compose picks the console script per service.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY services ./services
COPY cell_agent ./cell_agent
COPY substratectl ./substratectl
COPY deploy ./deploy
RUN pip install --no-cache-dir .
# compose's demo job writes the cells' agent URLs here; a new volume takes this owner.
RUN mkdir /demo && chown nobody /demo
USER nobody
