# One image for every service of compose.yaml, which gives each its command: the workers
# (`celery -A workers worker -Q <queue> ...`, the local queue's MLX models included, hence
# [local]), `celery -A workers beat`, `celery -A workers flower`, the ledger writer and
# the gateway (`fleet ledger-writer`, `fleet serve`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md beat_schedule.py ./
COPY router ./router
COPY client ./client
COPY gateway ./gateway
COPY workers ./workers
RUN pip install ".[local]"

# Not root: beat keeps its schedule file in /data, the local worker its model cache in HOME.
# (Both exist in the image so that their named volumes start owned by fleet, not root.)
RUN useradd --create-home --uid 1000 fleet \
    && mkdir -p /data /home/fleet/.cache \
    && chown fleet:fleet /data /home/fleet/.cache
USER fleet
