# The perq worker image (docker-compose.yml's `worker` service). The same image also runs the CLI:
#   docker compose run --rm worker perq status
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY producer ./producer
COPY worker ./worker
# mcp: workers start MCP skills; s3: the job store may live in a bucket (PERQ_STORAGE=s3://...);
# google, bedrock: the SDKs of the google, google-vertex and amazon-bedrock providers
RUN pip install ".[mcp,s3,google,bedrock]"
COPY examples ./examples

# Run as a user of its own; the store and the workspace are volumes, created owned by that user
RUN useradd --create-home --uid 1000 perq \
    && mkdir -p /data/perstack /workspace \
    && chown -R perq:perq /data /workspace
USER perq
WORKDIR /workspace
ENV PERQ_STORAGE=/data/perstack

# SIGTERM (docker stop) lets in-flight steps finish for PERQ_GRACE_SECONDS, then hands them back
CMD ["perq", "worker"]
