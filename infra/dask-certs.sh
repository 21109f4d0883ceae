#!/bin/sh
# Certificates for a Dask cluster over TLS with mutual authentication (docker-compose.tls.yml):
# the scheduler and its workers accept only peers whose certificate this CA signed, so only
# holders of such a certificate can submit work (an open scheduler runs code for anyone).
#
#   infra/dask-certs.sh infra/certs      # writes ca.pem, node.pem + node-key.pem, client.pem +
#                                        # client-key.pem; keeps ca-key.pem to sign more later
#
# Dask checks the signature, not host names (it expects a dedicated CA per cluster), so one
# node certificate serves the scheduler and every worker, and one client certificate serves
# segflow (the Prefect worker, or your shell with the DASK_DISTRIBUTED__COMM__TLS__* variables
# of infra/README.md). Give out client keys as you would SSH keys; to revoke, make a new CA.
set -eu
out=${1:?usage: dask-certs.sh OUTPUT_FOLDER}
days=${DASK_CERT_DAYS:-825}
mkdir -p "$out"
umask 077  # keys readable by their owner only
cd "$out"
if [ ! -f ca-key.pem ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -days "$days" -subj "/CN=segflow dask CA" \
        -keyout ca-key.pem -out ca.pem 2>/dev/null
fi
for name in node client; do
    openssl req -newkey rsa:3072 -nodes -subj "/CN=segflow dask $name" \
        -keyout "$name-key.pem" -out "$name.csr" 2>/dev/null
    printf 'subjectAltName=DNS:dask-scheduler,DNS:localhost,IP:127.0.0.1\n' > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
        -days "$days" -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
done
chmod 644 ca.pem node.pem client.pem
echo "dask-certs: CA, node and client certificates in $out"
