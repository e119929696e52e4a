#!/usr/bin/env python3
"""A Comet client built on the stock `redis` package (pip install redis, or Debian's
python3-redis): AUTH with conn_id and token, SUBSCRIBE, and every push is a message.

usage: redis_client.py HOST PORT CONN_ID TOKEN [COUNT]
Prints each pushed message on its own line; exits after COUNT messages if given.
"""
import sys

import redis


def main() -> int:
    host, port, conn_id, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    count = int(sys.argv[5]) if len(sys.argv) > 5 else None
    # client_name becomes the `info` handed to the message server's callbacks.
    client = redis.Redis(host=host, port=port, username=conn_id, password=token,
                         client_name="redis-py-example")
    pubsub = client.pubsub()
    pubsub.subscribe("comet")  # any channel name; pushes arrive on the first one
    received = 0
    for message in pubsub.listen():
        if message["type"] == "subscribe":
            print("subscribed", flush=True)
        elif message["type"] == "message":
            print(message["data"].decode(), flush=True)
            received += 1
            if count is not None and received == count:
                return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
