# One image for both processes: `videogen-gateway` (the default command) and `videogen-worker`.
# docker-compose.yml builds it for both services; on its own:
#
#   docker build -t videogen .
#   docker run --rm -p 8080:8080 -e VIDEOGEN_HOST=0.0.0.0 -e VIDEOGEN_AMQP_URL=... videogen
#   docker run --rm --gpus all -e VIDEOGEN_AMQP_URL=... videogen videogen-worker
#
# (every VIDEOGEN_* setting is listed in README.md, "Configuration").
#
# `pip install .` resolves torch>=2.5 from PyPI, which on Linux x86_64 is a CUDA build, so the
# same image runs the worker on a GPU (with the NVIDIA container toolkit on the host) or on CPU.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Hugging Face downloads go here; docker-compose.yml mounts the hf-cache volume on it.
ENV HF_HOME=/var/cache/huggingface

WORKDIR /app

# Dependencies first, in their own layer (torch and the CUDA libraries are several GB): it is
# rebuilt only when pyproject.toml changes. With no package folders yet, this installs the
# dependencies and an empty `videogen` distribution.
COPY pyproject.toml README.md ./
RUN pip install .

# The code, then the project itself without touching the dependencies: this installs the
# `videogen-gateway` and `videogen-worker` commands.
COPY common ./common
COPY schemas ./schemas
COPY gateway ./gateway
COPY worker ./worker
# The check runs from / so that it imports the installed packages, not the copies in /app.
RUN pip install --no-deps . \
 && cd / && python -c "import common, gateway, worker; from schemas.registry import load_registry; load_registry()"

RUN useradd --create-home --uid 1000 videogen \
 && mkdir -p "$HF_HOME" \
 && chown videogen "$HF_HOME"
USER videogen

# 8080: gateway HTTP/WebSocket (VIDEOGEN_PORT). 8081: worker /health and /ready (VIDEOGEN_HEALTH_PORT).
EXPOSE 8080 8081

CMD ["videogen-gateway"]
