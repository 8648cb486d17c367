# rtpengine from Debian's package, userspace forwarding (no kernel module needed in a
# container). Used by docker-compose.sip.yml.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends rtpengine-daemon \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["rtpengine", "--config-file=none", "--foreground", "--log-stderr", "--table=-1"]
