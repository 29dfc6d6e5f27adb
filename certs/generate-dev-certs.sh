#!/usr/bin/env bash
# Regenerates the THROW-AWAY development chain in this folder: a root CA, an intermediate
# and a leaf for localhost / 127.0.0.1 / ::1, all ECDSA P-256. These keys are public (they
# are committed): never use them for anything but local development.
#
#   ./certs/generate-dev-certs.sh                          # regenerate the committed chain
#   ./certs/generate-dev-certs.sh example.com www.example.com   # a certificate for any names
#
# Without arguments it produces: dev-root-ca.crt (trust this one in curl: --cacert
# certs/dev-root-ca.crt), dev-intermediate.crt, localhost.crt (leaf + intermediate, what
# Gatehouse serves), localhost.key, dev-ca-bundle.crt (intermediate + root, the optional
# ca_bundle). Its CA keys are thrown away.
#
# With names (mkcert-style) it keeps a local dev CA in certs/local-ca/ (created on first
# use, git-ignored, private to this machine) and writes certs/local/FIRST-NAME.crt (leaf +
# intermediate) and .key, e.g. to try the compose example as example.com. Trust
# certs/local-ca/root.crt in your browser or curl (--cacert).
set -euo pipefail
cd "$(dirname "$0")"

leaf_ext() { # names... -> an extension file on stdout
  local san="" name
  for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
  done
  printf 'basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "${san%,}"
}

if [ $# -gt 0 ]; then
  umask 077
  ca=local-ca
  if [ ! -f "$ca/intermediate.key" ]; then
    mkdir -p "$ca"
    openssl ecparam -name prime256v1 -genkey -noout -out "$ca/root.key"
    openssl req -x509 -new -key "$ca/root.key" -sha256 -days 3650 \
      -subj "/O=Gatehouse local dev CA/CN=Gatehouse Local Dev Root ($(hostname))" \
      -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out "$ca/root.crt"
    openssl ecparam -name prime256v1 -genkey -noout -out "$ca/intermediate.key"
    openssl req -new -key "$ca/intermediate.key" -subj "/O=Gatehouse local dev CA/CN=Gatehouse Local Dev Intermediate" \
      -out "$ca/intermediate.csr"
    printf 'basicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n' > "$ca/intermediate.ext"
    openssl x509 -req -in "$ca/intermediate.csr" -CA "$ca/root.crt" -CAkey "$ca/root.key" -CAcreateserial \
      -days 3650 -sha256 -extfile "$ca/intermediate.ext" -out "$ca/intermediate.crt"
    echo "created a local dev CA in $(pwd)/$ca (trust $ca/root.crt)"
  fi
  mkdir -p local
  out="local/$1"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$out.key"
  openssl req -new -key "$out.key" -subj "/O=Gatehouse local dev/CN=$1" -out "$work/leaf.csr"
  leaf_ext "$@" > "$work/leaf.ext"
  openssl x509 -req -in "$work/leaf.csr" -CA "$ca/intermediate.crt" -CAkey "$ca/intermediate.key" \
    -CAcreateserial -days 825 -sha256 -extfile "$work/leaf.ext" -out "$work/leaf.crt"
  cat "$work/leaf.crt" "$ca/intermediate.crt" > "$out.crt"
  chmod 0644 "$out.crt"
  echo "wrote $(pwd)/$out.crt and $out.key for: $*"
  echo "trust $(pwd)/$ca/root.crt, e.g. curl --cacert certs/$ca/root.crt https://$1/"
  exit 0
fi
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
leaf_ext localhost 127.0.0.1 ::1 > "$work/leaf.ext"
openssl x509 -req -in "$work/leaf.csr" -CA dev-intermediate.crt -CAkey "$work/int.key" -CAcreateserial \
  -days "$days" -sha256 -extfile "$work/leaf.ext" -out "$work/leaf.crt"

cat "$work/leaf.crt" dev-intermediate.crt > localhost.crt
cat dev-intermediate.crt dev-root-ca.crt > dev-ca-bundle.crt
rm -f dev-root-ca.srl dev-intermediate.srl
echo "regenerated throw-away dev chain in $(pwd)"
