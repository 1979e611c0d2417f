"""Measures what a 12-second partition costs after it heals, on a given nats-server build: cut host
A (the exporter's) or host B (the importer's) off for 12 s while A publishes 4 KiB versions at
about 30/s, heal, and time until B serves the version A had at the heal and until B's stale flag
clears. Used to choose and document the supported server versions (docs/MIRROR.md).

    sudo python3 Tests/mirror/partition_heal.py [/path/to/nats-server] [rounds]
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import test_mirror_cluster as harness  # noqa: E402
from cluster import Checker, Publisher, wait_for  # noqa: E402


def main():
    if len(sys.argv) > 1:
        harness.SERVER = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    version = subprocess.run([harness.SERVER, "--version"], capture_output=True, text=True).stdout.strip()
    env = harness.Environment()
    try:
        publisher = Publisher(env.a_socket, "small", 4096)
        checker = Checker(env.b_socket, "small")
        publisher.start()
        checker.start()
        wait_for(lambda: publisher.latest > 0 and checker.latest >= publisher.latest - 5, 30, "a steady state")
        time.sleep(2)
        for _ in range(rounds):
            for host in ("a", "b"):
                env.cluster.link(host, up=False)
                time.sleep(12)
                env.cluster.link(host, up=True)
                healed = time.monotonic()
                target = publisher.latest
                wait_for(lambda: checker.latest >= target, 120, "B to converge")
                converged = time.monotonic() - healed
                wait_for(lambda: checker.stale_changes and not checker.stale_changes[-1][1], 120, "fresh")
                fresh = checker.stale_changes[-1][0] - healed
                print(f"{version}: host {host} cut 12 s: B served A's version at the heal {converged:.1f} s after it, "
                      f"fresh again after {fresh:.1f} s; publisher failures so far {publisher.failures}", flush=True)
                time.sleep(3)
        publisher.stop()
        checker.stop()
        assert not checker.errors, checker.errors[:3]
    finally:
        env.cluster.teardown()
        env.cluster.remove()


if __name__ == "__main__":
    main()
