#!/bin/sh
# Signs a Comet client token (EdDSA JSON Web Token) with openssl, from an Ed25519
# private key whose public half is in token_public_keys under KID:
#     openssl genpkey -algorithm ed25519 -out issuer.pem
#     openssl pkey -in issuer.pem -pubout        # into token_public_keys, after "kid: KID"
#     sh sign_token_eddsa.sh issuer.pem KID CONN_ID [TTL_SECONDS]
set -eu
key=$1 kid=$2 conn_id=$3 ttl=${4:-3600}
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
now=$(date +%s)
header=$(printf '{"alg":"EdDSA","typ":"JWT","kid":"%s"}' "$kid" | b64url)
claims=$(printf '{"sub":"%s","iat":%s,"exp":%s}' "$conn_id" "$now" $((now + ttl)) | b64url)
input=$(mktemp)
trap 'rm -f "$input"' EXIT
printf '%s.%s' "$header" "$claims" >"$input"
signature=$(openssl pkeyutl -sign -inkey "$key" -rawin -in "$input" | b64url)
printf '%s.%s.%s\n' "$header" "$claims" "$signature"
