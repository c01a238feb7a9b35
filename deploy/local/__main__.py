"""python -m deploy.local {prepare,up,down,status,env}: start, stop or show the local broker + Redis.

  prepare fetch and check what the broker needs (Apache Kafka: Java 17+, its jars from Maven Central, once);
          one line saying what is missing otherwise
  up      start a broker (BROKER=kafka|tansu; Apache Kafka by default) and Redis (reuses REDIS_URL if it
          answers); idempotent
  down    stop exactly the processes `up` started, and remove the broker's data (--keep-data keeps it for
          the next `up`)
  status  what runs, with addresses and PIDs
  env     print the KAFKA_BOOTSTRAP_SERVERS / REDIS_URL lines (`eval $(python -m deploy.local env)`)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from deploy.local.errors import StackError
from deploy.local.stack import BROKERS, DEFAULT_BROKER, DEFAULT_STATE_DIR, LocalStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "up", "down", "status", "env"])
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help="where PIDs, logs and the env file go")
    parser.add_argument("--broker", choices=BROKERS, default=None,
                        help=f"kafka: Apache Kafka (Java 17+ and Maven; jars fetched once from Maven Central); "
                             f"tansu: no JVM, from a wheel (default: $BROKER or {DEFAULT_BROKER})")
    parser.add_argument("--keep-data", action="store_true",
                        help="down: keep the broker's data dir, so the next up has the same topics and offsets")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")  # one line
    args = parser.parse_args(argv)
    try:
        existing = LocalStack.load(args.state_dir)
        if args.command == "prepare":
            print(LocalStack(args.state_dir, args.broker).prepare_broker(), file=sys.stderr)
        elif args.command == "up":
            if existing and all(s["running"] for s in existing.status().values()):
                print(f"already up ({existing.broker_kind}); state in {existing.state_dir}", file=sys.stderr)
                stack = existing
            else:
                if existing:
                    existing.down(keep_data=True)  # a half-dead stack: restart it on the same data
                started = time.perf_counter()
                stack = LocalStack(args.state_dir, args.broker).up()
                print(f"up in {time.perf_counter() - started:.2f} s ({stack.broker_kind}); "
                      f"env file {stack.state_dir / 'stack.env'}", file=sys.stderr)
            print("".join(f"{k}={v}\n" for k, v in stack.env().items()), end="")
        elif args.command == "down":
            if existing:
                existing.down(keep_data=args.keep_data)
                print("down" + (" (broker data kept)" if args.keep_data else ""), file=sys.stderr)
            else:
                print("nothing to stop", file=sys.stderr)
        elif args.command == "status":
            if not existing:
                print("not running")
                return 1
            print(json.dumps(existing.status(), indent=2))
        elif args.command == "env":
            if not existing:
                print("not running: python -m deploy.local up", file=sys.stderr)
                return 1
            print("".join(f"export {k}={v}\n" for k, v in existing.env().items()), end="")
    except StackError as exc:
        print(f"python -m deploy.local: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
