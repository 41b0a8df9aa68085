# syntax=docker/dockerfile:1
# iotgw's image: the services and the CLI, installed from uv.lock, run as a non-root user.
#   docker build -t iotgw .          (compose/docker-compose.yml builds it too)

FROM python:3.11-slim-bookworm AS build
ENV UV_PROJECT_ENVIRONMENT=/opt/iotgw \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
# The dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY README.md ./
COPY gateway ./gateway
COPY schemas ./schemas
COPY simulators ./simulators
RUN uv sync --frozen --no-dev --no-editable

FROM python:3.11-slim-bookworm
# uid 1883 is also the `mosquitto` user of the eclipse-mosquitto image: the password file
# and the server key that iotgw writes (mode 0600) are readable by the broker, no one else.
RUN groupadd --gid 1883 iotgw \
    && useradd --uid 1883 --gid 1883 --home-dir /var/lib/iotgw --shell /usr/sbin/nologin iotgw \
    && mkdir -p /var/lib/iotgw/certs /var/lib/iotgw/ca /var/lib/iotgw/auth /etc/iotgw \
    && chown -R iotgw:iotgw /var/lib/iotgw
COPY --from=build /opt/iotgw /opt/iotgw
COPY rules.yaml /etc/iotgw/rules.yaml
ENV PATH=/opt/iotgw/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    IOTGW_RULES_FILE=/etc/iotgw/rules.yaml
USER iotgw
WORKDIR /var/lib/iotgw
ENTRYPOINT ["iotgw"]
CMD ["--help"]
