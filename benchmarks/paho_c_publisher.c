/*
 * The Paho C rows of publish_throughput.py: Eclipse Paho C's MQTTClient (libpaho-mqtt3c)
 * publishing N messages with its file persistence, the durable C client the benchmark compares
 * FileStore(fsync=False) with (same durability class: Paho's persistence writes one file per
 * in-flight message and never fsyncs, so it survives a process crash, not a power cut).
 *
 *   paho_c_publisher HOST PORT TOPIC COUNT PAYLOAD_BYTES QOS WINDOW PERSIST_DIR CLIENT_ID
 *   paho_c_publisher --version      (prints the library's version)
 *
 * WINDOW 1: one message at a time, each MQTTClient_publishMessage waiting for the previous
 * message's completion. WINDOW k > 1: up to k messages in flight (maxInflightMessages = k).
 * PERSIST_DIR "-" means MQTTCLIENT_PERSISTENCE_NONE.
 *
 * Completions are taken from the deliveryComplete callback (MQTTClient_setCallbacks, so Paho's
 * own thread reads the socket) through a condition variable, not from
 * MQTTClient_waitForCompletion: in 1.3.x that one polls with MQTTClient_yield(), which runs
 * (or, with callbacks, sleeps) for 100 ms per call, so one-at-a-time publishing measured ~10
 * msg/s, the poll interval rather than the client. Paho calls deliveryComplete after it took the
 * message out of its in-flight list and its persistence, so gating publishes on that count
 * never makes MQTTClient_publishMessage block on a full window (it would yield 100 ms too).
 *
 * Payload i is i as 8 ASCII digits followed by 'x' up to PAYLOAD_BYTES, as make_payloads() in
 * _observer.py builds them. Output, one line each: "connected", then "start T" and "acked T"
 * with T = CLOCK_MONOTONIC in seconds (the clock of Python's time.monotonic()), taken just
 * before the first publish and just after the last completion; "error ..." and exit status 1
 * on any failure.
 *
 * Built by publish_throughput.py at run time with `cc -O2 ... -lpaho-mqtt3c` into a temp dir.
 */
#include <MQTTClient.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TIMEOUT_SECONDS 30

/* Completed deliveries, counted by Paho's thread in deliveryComplete. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static long completed = 0;
static int connection_lost = 0;

static void on_delivery_complete(void *context, MQTTClient_deliveryToken token)
{
    (void)context;
    (void)token;
    pthread_mutex_lock(&lock);
    completed++;
    pthread_cond_signal(&changed);
    pthread_mutex_unlock(&lock);
}

static void on_connection_lost(void *context, char *cause)
{
    (void)context;
    (void)cause;
    pthread_mutex_lock(&lock);
    connection_lost = 1;
    pthread_cond_signal(&changed);
    pthread_mutex_unlock(&lock);
}

static int on_message(void *context, char *topic, int topic_length, MQTTClient_message *message)
{
    (void)context;
    (void)topic_length;
    MQTTClient_freeMessage(&message);
    MQTTClient_free(topic);
    return 1; /* nothing is subscribed; required by MQTTClient_setCallbacks */
}

/* Wait until fewer than `open_limit` of `published` messages are incomplete; 0 or an error. */
static int wait_until_open_below(long published, long open_limit)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += TIMEOUT_SECONDS;
    int rc = 0;
    pthread_mutex_lock(&lock);
    while (published - completed >= open_limit && !connection_lost && rc == 0)
        rc = pthread_cond_timedwait(&changed, &lock, &deadline);
    if (connection_lost)
        rc = -1;
    pthread_mutex_unlock(&lock);
    return rc;
}

static double monotonic_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int fail(const char *what, int rc)
{
    printf("error %s: %d\n", what, rc);
    fflush(stdout);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        for (MQTTClient_nameValue *info = MQTTClient_getVersionInfo(); info->name; info++)
            if (strcmp(info->name, "Version") == 0)
                printf("%s\n", info->value);
        return 0;
    }
    if (argc != 10) {
        fprintf(stderr, "usage: %s HOST PORT TOPIC COUNT PAYLOAD_BYTES QOS WINDOW PERSIST_DIR "
                        "CLIENT_ID\n", argv[0]);
        return 2;
    }
    const char *host = argv[1], *port = argv[2], *topic = argv[3];
    long count = atol(argv[4]);
    int size = atoi(argv[5]), qos = atoi(argv[6]), window = atoi(argv[7]);
    const char *persist_dir = argv[8], *client_id = argv[9];
    if (count < 1 || size < 8 || qos < 1 || qos > 2 || window < 1 || window > 65535)
        return fail("bad arguments", 0);

    char uri[256];
    snprintf(uri, sizeof uri, "tcp://%s:%s", host, port);
    int persistence = strcmp(persist_dir, "-") == 0 ? MQTTCLIENT_PERSISTENCE_NONE
                                                     : MQTTCLIENT_PERSISTENCE_DEFAULT;
    MQTTClient client;
    int rc = MQTTClient_create(&client, uri, client_id, persistence,
                               persistence == MQTTCLIENT_PERSISTENCE_NONE ? NULL
                                                                          : (void *)persist_dir);
    if (rc != MQTTCLIENT_SUCCESS)
        return fail("MQTTClient_create", rc);

    rc = MQTTClient_setCallbacks(client, NULL, on_connection_lost, on_message,
                                 on_delivery_complete);
    if (rc != MQTTCLIENT_SUCCESS)
        return fail("MQTTClient_setCallbacks", rc);

    MQTTClient_connectOptions options = MQTTClient_connectOptions_initializer;
    options.keepAliveInterval = 60;
    options.cleansession = 1;
    options.MQTTVersion = MQTTVERSION_3_1_1;
    options.maxInflightMessages = window;
    rc = MQTTClient_connect(client, &options);
    if (rc != MQTTCLIENT_SUCCESS)
        return fail("MQTTClient_connect", rc);
    printf("connected\n");
    fflush(stdout);

    char *payload = malloc((size_t)size + 1);
    if (payload == NULL)
        return fail("out of memory", 0);
    memset(payload, 'x', (size_t)size);

    double t_start = monotonic_seconds();
    for (long i = 0; i < count; i++) {
        rc = wait_until_open_below(i, window);
        if (rc != 0)
            return fail("waiting for a completion (timeout or connection lost)", rc);
        char digits[9];
        snprintf(digits, sizeof digits, "%08ld", i % 100000000L);
        memcpy(payload, digits, 8);
        MQTTClient_message message = MQTTClient_message_initializer;
        message.payload = payload;
        message.payloadlen = size;
        message.qos = qos;
        message.retained = 0;
        MQTTClient_deliveryToken token;
        rc = MQTTClient_publishMessage(client, topic, &message, &token);
        if (rc != MQTTCLIENT_SUCCESS)
            return fail("MQTTClient_publishMessage", rc);
    }
    rc = wait_until_open_below(count, 1);
    if (rc != 0)
        return fail("waiting for the last completions (timeout or connection lost)", rc);
    double t_acked = monotonic_seconds();
    printf("start %.9f\nacked %.9f\n", t_start, t_acked);
    fflush(stdout);

    MQTTClient_disconnect(client, 10000);
    MQTTClient_destroy(&client);
    free(payload);
    return 0;
}
