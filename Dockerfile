# The edge runtime image: every edgefleet service, no torch. The model is built once on a machine with
# the build extra (`edgefleet model build`) and mounted at /models; devices never build it.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY edgefleet edgefleet
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home edgefleet
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER edgefleet
ENV EDGEFLEET_MODEL_DIR=/models/efficientnet-lite0 \
    EDGEFLEET_LOG_FORMAT=json
ENTRYPOINT ["edgefleet"]
CMD ["inference"]
