# careflow-sip container image: built with Rust in one stage, run from debian:bookworm-slim as
# an unprivileged user in the next (about 30 MB plus the base). See contrib/docker/ for the
# compose file with PostgreSQL, Redis and rtpengine.
#
#   docker build -t careflow-sip .
#   docker run --network host -v careflow-data:/var/lib/careflow-sip careflow-sip

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits rebuild only our crates.
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY bin bin
RUN cargo build --release --locked -p careflow-sip \
 && strip target/release/careflow-sip

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 careflow-sip \
 && useradd --system --uid 10001 --gid careflow-sip --home-dir /var/lib/careflow-sip \
        --shell /usr/sbin/nologin careflow-sip \
 && install -d -o careflow-sip -g careflow-sip -m 0750 /var/lib/careflow-sip
COPY --from=build /src/target/release/careflow-sip /usr/bin/careflow-sip
COPY contrib/docker/careflow-sip.toml /etc/careflow-sip/careflow-sip.toml
ENV CAREFLOW_CONFIG=/etc/careflow-sip/careflow-sip.toml
USER 10001:10001
WORKDIR /var/lib/careflow-sip
VOLUME ["/var/lib/careflow-sip"]
# SIP over UDP/TCP, TLS, secure WebSocket; HTTP (dashboard, API, metrics).
EXPOSE 5060/udp 5060/tcp 5061/tcp 8443/tcp 8080/tcp
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/bin/careflow-sip", "healthcheck"]
# SIGTERM lets in-flight transactions finish (give it up to 40 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/careflow-sip"]
CMD ["serve"]
