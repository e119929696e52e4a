#!/usr/bin/env python3
"""A Comet client on a stock Python Redis library with its default settings, driven by
tests/redis_clients.rs: `py_client.py <config JSON>`.

config: {lib: "redis" (redis-py, sync) | "redis-asyncio" | "coredis", port, conn_id,
token, auth: "user" | "object", protocol: null (the library's default) | 2 | 3,
ca: PEM path for TLS or null, idle_ms}. Events and stdin commands as
tests/clients/node_client.js: "pong", "subscribed", "message <data>",
"pong-after-unsubscribe", "error <text>", "done"; "unsubscribe", "subscribe", "quit".
"""
import asyncio
import json
import queue
import sys
import threading
import time

config = json.loads(sys.argv[1])


def say(line):
    print(line, flush=True)


def options():
    kwargs = {"host": "127.0.0.1", "port": config["port"]}
    if config["auth"] == "object":
        kwargs["password"] = json.dumps(
            {"conn_id": config["conn_id"], "token": config["token"], "info": "python"})
    else:
        kwargs["username"] = config["conn_id"]
        kwargs["password"] = config["token"]
    if config["protocol"]:
        kwargs["protocol"] = config["protocol"]
    if config["ca"]:
        # The test certificate names localhost, and checking it is the default.
        kwargs["host"] = "localhost"
        kwargs["ssl"] = True
        kwargs["ssl_ca_certs"] = config["ca"]
    return kwargs


def stdin_commands():
    commands = queue.Queue()

    def pump():
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put("quit")

    threading.Thread(target=pump, daemon=True).start()
    return commands


def next_command(commands):
    try:
        return commands.get_nowait()
    except queue.Empty:
        return None


def run_sync():
    import redis

    client = redis.Redis(**options())
    say("pong %s" % client.ping())
    time.sleep(config["idle_ms"] / 1000)
    # The pool hands the PubSub the connection the PING used, idle since.
    pubsub = client.pubsub()
    pubsub.subscribe("inbox")
    commands = stdin_commands()
    while True:
        try:
            message = pubsub.get_message(timeout=0.05)
        except redis.ConnectionError as err:
            # redis-py 4 reports the lost connection once; the next call reconnects and
            # resubscribes (its own on_connect), as 4.x applications rely on.
            say("error %s" % err)
            continue
        if message and message["type"] == "subscribe":
            say("subscribed")
        elif message and message["type"] == "message":
            say("message %s" % message["data"].decode())
        command = next_command(commands)
        if command == "unsubscribe":
            pubsub.unsubscribe("inbox")
            say("pong-after-unsubscribe %s" % client.ping())
        elif command == "subscribe":
            pubsub.subscribe("inbox")
        elif command == "quit":
            pubsub.close()
            client.close()
            say("done")
            return


async def run_asyncio():
    import redis.asyncio as aredis

    client = aredis.Redis(**options())
    say("pong %s" % await client.ping())
    await asyncio.sleep(config["idle_ms"] / 1000)
    pubsub = client.pubsub()
    await pubsub.subscribe("inbox")
    commands = stdin_commands()
    while True:
        try:
            message = await pubsub.get_message(timeout=0.05)
        except aredis.ConnectionError as err:
            say("error %s" % err)
            continue
        if message and message["type"] == "subscribe":
            say("subscribed")
        elif message and message["type"] == "message":
            say("message %s" % message["data"].decode())
        command = next_command(commands)
        if command == "unsubscribe":
            await pubsub.unsubscribe("inbox")
            say("pong-after-unsubscribe %s" % await client.ping())
        elif command == "subscribe":
            await pubsub.subscribe("inbox")
        elif command == "quit":
            await pubsub.aclose()
            await client.aclose()
            say("done")
            return


async def run_coredis():
    import coredis

    kwargs = options()
    if config["ca"]:
        import ssl

        del kwargs["ssl"], kwargs["ssl_ca_certs"]
        kwargs["ssl_context"] = ssl.create_default_context(cafile=config["ca"])
    client = coredis.Redis(**kwargs)
    async with client:
        say("pong %s" % (await client.ping()).decode())
        await asyncio.sleep(config["idle_ms"] / 1000)
        commands = stdin_commands()
        async with client.pubsub(channels=["inbox"]) as pubsub:
            say("subscribed")
            while True:
                message = await pubsub.get_message(timeout=0.05)
                if message and message["type"] == "message":
                    data = message["data"]
                    say("message %s" % (data.decode() if isinstance(data, bytes) else data))
                elif message and message["type"] == "subscribe":
                    say("subscribed")
                command = next_command(commands)
                if command == "unsubscribe":
                    await pubsub.unsubscribe("inbox")
                    say("pong-after-unsubscribe %s" % (await client.ping()).decode())
                elif command == "subscribe":
                    await pubsub.subscribe("inbox")
                elif command == "quit":
                    break
    say("done")


if __name__ == "__main__":
    try:
        if config["lib"] == "redis":
            run_sync()
        elif config["lib"] == "redis-asyncio":
            asyncio.run(run_asyncio())
        else:
            import anyio

            anyio.run(run_coredis)
    except Exception as err:  # the test prints it with the rest of the output
        say("fatal %r" % err)
        sys.exit(1)
