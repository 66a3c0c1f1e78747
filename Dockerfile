# The Agent Studio image for Docker/Buildah users: one image for every role (`agent-studio <role>`).
#   docker build --build-arg VERSION=0.1.0 -t localhost/agent-studio:0.1.0 .
# scripts/build-image builds the same image without a daemon and reads this file's final stage for its
# ENV, USER, WORKDIR, ENTRYPOINT and LABEL lines (one per line, as below), so the two cannot disagree
# on them; tests/test_image.py checks what it cannot read (packages, Python dependencies, the user).

# Build stage: pip only lives here. --target keeps the app and its dependencies in one folder that the
# final stage copies; the console script's shebang is this Debian's /usr/bin/python3, as at run time.
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip binutils \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY agentstudio /src/agentstudio
RUN python3 -m pip install --no-cache-dir --no-compile --root-user-action=ignore --target /opt/agentstudio /src \
 && find /opt/agentstudio/bin -mindepth 1 ! -name agent-studio -delete \
 && rm -rf /opt/agentstudio/kubernetes/aio /opt/agentstudio/phonenumbers/geodata \
 && find /opt/agentstudio -name '*.so' -exec strip --strip-debug {} + \
 && python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/agentstudio

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 agentstudio \
 && useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin agentstudio
COPY --from=build /opt/agentstudio /opt/agentstudio
ARG VERSION
LABEL org.opencontainers.image.title="agent-studio"
LABEL org.opencontainers.image.description="Self-hosted, Kubernetes-native AI voice calls triggered by marketing-platform webhooks"
LABEL org.opencontainers.image.licenses="Apache-2.0"
LABEL org.opencontainers.image.version="${VERSION}"
ENV PATH=/opt/agentstudio/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENV PYTHONPATH=/opt/agentstudio
# The root filesystem is read-only at run time: every .pyc is compiled into the image.
ENV PYTHONDONTWRITEBYTECODE=1
ENV PYTHONUNBUFFERED=1
WORKDIR /opt/agentstudio
# Numeric, so the kubelet can check runAsNonRoot; the name (agentstudio) is in /etc/passwd for
# libraries that look the user up.
USER 10001:10001
ENTRYPOINT ["agent-studio"]
