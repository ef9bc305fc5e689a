#!/bin/sh
# First start of the "cluster" profile's mysql-replica (docker-entrypoint-initdb.d):
# replicate `mysql` from its first transaction, positions found by GTID. The
# primary gives anonymous transactions GTIDs here (its gtid_mode stays OFF).
set -eu
[ -n "${MYSQL_REPLICATION_PASSWORD:-}" ] || { echo "set MYSQL_REPLICATION_PASSWORD in deploy/.env" >&2; exit 1; }
mysql -uroot -p"$MYSQL_ROOT_PASSWORD" <<SQL
CHANGE REPLICATION SOURCE TO SOURCE_HOST='mysql', SOURCE_PORT=3306,
  SOURCE_USER='${MYSQL_REPLICATION_USER}', SOURCE_PASSWORD='${MYSQL_REPLICATION_PASSWORD}',
  GET_SOURCE_PUBLIC_KEY=1, SOURCE_CONNECT_RETRY=5, ASSIGN_GTIDS_TO_ANONYMOUS_TRANSACTIONS=LOCAL;
START REPLICA;
SQL
