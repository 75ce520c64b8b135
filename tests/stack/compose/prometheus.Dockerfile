# Test-only stand-in for prom/prometheus (no image registry on the test machines): Debian's
# prometheus package on the test's debootstrapped base. The same contract as the real image:
# the binary as entrypoint (compose.yaml passes only flags), wget for the healthcheck, and
# /prometheus owned by nobody, the user it runs as, so the named volume takes that owner.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o nobody -g nogroup -m 0755 /prometheus
USER 65534:65534
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
