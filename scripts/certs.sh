#!/usr/bin/env bash
# A certificate authority and a broker certificate for local runs, compose and the tests: cells
# connect with amqps:// and verify the broker against the CA they are given (CELL_CA_FILE).
#
#   scripts/certs.sh DIR     writes DIR/ca.pem, DIR/ca.key, DIR/broker.pem, DIR/broker.key
#
# The broker certificate names localhost, 127.0.0.1 and rabbitmq (compose's service name).
# Idempotent: a DIR that has them is left alone. For anything but local use, bring your own.
set -euo pipefail
dir=${1:?usage: scripts/certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
if [ -s ca.pem ] && [ -s broker.pem ] && [ -s broker.key ]; then
  exit 0
fi
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=Substrate local CA" \
  -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout broker.key -out broker.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost,DNS:rabbitmq,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >broker.ext
openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
  -extfile broker.ext -out broker.pem 2>/dev/null
rm -f broker.csr broker.ext ca.srl
chmod 600 ca.key broker.key
echo "CA $dir/ca.pem, broker certificate $dir/broker.pem"
