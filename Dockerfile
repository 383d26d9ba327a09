# Multi-stage build: compile in the Rust image, run in a slim Debian image as a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin cpsgate

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --uid 10001 cpsgate
COPY --from=build /src/target/release/cpsgate /usr/local/bin/cpsgate
# The shipped config binds loopback; mount your own over it (see README, "Running in a container").
COPY config/cpsgate.toml /etc/cpsgate/cpsgate.toml
USER cpsgate
EXPOSE 5060/udp 5060/tcp
# Exec form: cpsgate is PID 1 and receives SIGTERM itself (no shell in between).
ENTRYPOINT ["/usr/local/bin/cpsgate"]
CMD ["run", "--config", "/etc/cpsgate/cpsgate.toml", "--log-format", "json"]
