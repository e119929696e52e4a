#!/usr/bin/env python3
"""Signs a Comet client token (HS256 JSON Web Token) with the standard library only.

    python3 sign_token.py SECRET CONN_ID [TTL_SECONDS] [INFO]

prints the token to put in the `token` field of the `t` parameter. Comet checks the
signature with `token_secret` (or `token_secret_previous`), that `sub` equals the
conn_id, that `exp` has not passed and that `iat` is not in the future.
"""
import base64
import hashlib
import hmac
import json
import sys
import time


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(secret: str, conn_id: str, ttl: int = 3600, info: str = "", now: int = None) -> str:
    now = int(time.time()) if now is None else now
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"sub": conn_id, "iat": now, "exp": now + ttl}
    if info:
        claims["info"] = info
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    secret, conn_id = sys.argv[1], sys.argv[2]
    ttl = int(sys.argv[3]) if len(sys.argv) > 3 else 3600
    info = sys.argv[4] if len(sys.argv) > 4 else ""
    # An optional fifth argument signs with another clock (tests: future-dated tokens).
    now = int(sys.argv[5]) if len(sys.argv) > 5 else None
    print(sign(secret, conn_id, ttl, info, now))
