#!/usr/bin/env bash
# Start RabbitMQ, MariaDB and Redis on this machine if one of them is down
# (the commands of Debian's packages, as root). Used by .ci/run.
set -uo pipefail
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_up() { for _ in $(seq 1 60); do up "$1" && return 0; sleep 1; done; echo "$2 did not come up on port $1" >&2; return 1; }
if ! up 6379; then
  echo "starting redis-server" >&2
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_up 6379 redis || exit 1
fi
if ! up 3306; then
  echo "starting mariadbd" >&2
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_up 3306 mariadb || exit 1
fi
if ! up 5672; then
  echo "starting rabbitmq-server" >&2
  rabbitmq-server -detached
  wait_up 5672 rabbitmq || exit 1
fi
