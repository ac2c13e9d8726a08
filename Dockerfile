# The control-plane image the Helm chart runs: one image, two entrypoints
#   python -m kubetune.operator     (the operator Deployment)
#   python -m kubetune.service      (the suggestion service Deployment)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubetune ./kubetune
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[cluster]"

FROM python:3.11-slim
RUN useradd --uid 65532 --create-home kubetune
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 65532
ENV PYTHONUNBUFFERED=1
ENTRYPOINT []
CMD ["python", "-m", "kubetune.operator"]
