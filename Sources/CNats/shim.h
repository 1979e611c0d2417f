/* The NATS C client (Debian libnats-dev): connections, core publish/subscribe and JetStream
 * key-value buckets, used by shmbroker-mirror. */
#include <nats/nats.h>
