#!/usr/bin/env bash
# Regenerates the THROW-AWAY development chain in this folder: a root CA, an intermediate
# and a leaf for localhost / 127.0.0.1 / ::1, all ECDSA P-256. These keys are public (they
# are committed): never use them for anything but local development.
#
#   ./certs/generate-dev-certs.sh          # from the repository root
#
# Produces: dev-root-ca.crt (trust this one in curl: --cacert certs/dev-root-ca.crt),
# dev-intermediate.crt, localhost.crt (leaf + intermediate, what Gatehouse serves),
# localhost.key, dev-ca-bundle.crt (intermediate + root, the optional ca_bundle).
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
days=3650

openssl ecparam -name prime256v1 -genkey -noout -out "$work/root.key"
openssl req -x509 -new -key "$work/root.key" -sha256 -days "$days" \
  -subj "/O=Gatehouse DEV ONLY/CN=Gatehouse Dev Root CA (throw-away)" \
  -addext "basicConstraints=critical,CA:true" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out dev-root-ca.crt

openssl ecparam -name prime256v1 -genkey -noout -out "$work/int.key"
openssl req -new -key "$work/int.key" -subj "/O=Gatehouse DEV ONLY/CN=Gatehouse Dev Intermediate CA (throw-away)" -out "$work/int.csr"
cat > "$work/int.ext" <<EXT
basicConstraints=critical,CA:true,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
EXT
openssl x509 -req -in "$work/int.csr" -CA dev-root-ca.crt -CAkey "$work/root.key" -CAcreateserial \
  -days "$days" -sha256 -extfile "$work/int.ext" -out dev-intermediate.crt

openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out localhost.key
openssl req -new -key localhost.key -subj "/O=Gatehouse DEV ONLY/CN=localhost" -out "$work/leaf.csr"
cat > "$work/leaf.ext" <<EXT
basicConstraints=critical,CA:false
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
EXT
openssl x509 -req -in "$work/leaf.csr" -CA dev-intermediate.crt -CAkey "$work/int.key" -CAcreateserial \
  -days "$days" -sha256 -extfile "$work/leaf.ext" -out "$work/leaf.crt"

cat "$work/leaf.crt" dev-intermediate.crt > localhost.crt
cat dev-intermediate.crt dev-root-ca.crt > dev-ca-bundle.crt
rm -f dev-root-ca.srl dev-intermediate.srl
echo "regenerated throw-away dev chain in $(pwd)"
