/*
 * The benchmark's outside subscriber: a minimal MQTT 3.1.1 QoS 0 subscriber in C that writes
 * one line per arrived message, "<CLOCK_REALTIME seconds.nanoseconds> <payload>\n", to stdout:
 * the same format as `mosquitto_sub -F '%U %p'`, so _observer.ArrivalCounter reads either.
 *
 *   observer HOST PORT TOPIC CLIENT_ID
 *
 * Why our own: mosquitto_sub reads every packet header a byte per read() and writes and flushes
 * each message on its own, ~14 µs per message; it was 100 % busy at ~70k msg/s on the 2-core
 * benchmark machine, near the fastest clients' rates. This one reads up to 1 MiB per read(),
 * takes one timestamp per read (the messages of one read were all there by then), and writes
 * its lines through one stdio buffer flushed after every read: ~1 µs of CPU per message
 * (mosquitto_sub: 9-12 µs), so the broker, not the observer, is the limit.
 *
 * It subscribes at QoS 0 (see _observer.py for why that is exact), keepalive 0 (the broker
 * never disconnects an idle observer). It exits on SIGTERM/SIGINT after flushing, or with
 * status 1 and a line on stderr if the connection fails, the broker refuses, or a packet it
 * cannot parse arrives. Built by publish_throughput.py at run time with `cc -O2`.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BUFFER_SIZE (1 << 20)
/* After a read of less than BATCH_BYTES, sleep PAUSE_NS before the next one. Without it, a
 * fast observer wakes for every few messages and spends ~3.5 µs of CPU per message on wake-ups,
 * reads and writes (measured at 50-100k msg/s), CPU that the broker and the publisher on the
 * same 2 cores then lack; with it, ~1 µs, and the blast rows ran 10-50 % faster. The price: a
 * message is stamped up to 0.5 ms after it arrived, under 0.25 % of any run of 0.2 s or more.
 * The broker keeps writing meanwhile (into the socket buffer; 0.5 ms is ~50 messages here). */
#define BATCH_BYTES 65536
#define PAUSE_NS 500000L

static volatile sig_atomic_t stopping = 0;

static void on_signal(int signum)
{
    (void)signum;
    stopping = 1;
}

static int die(const char *what)
{
    fprintf(stderr, "observer: %s\n", what);
    fflush(stdout);
    return 1;
}

static int send_all(int fd, const unsigned char *data, size_t length)
{
    while (length > 0) {
        ssize_t n = send(fd, data, length, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        length -= (size_t)n;
    }
    return 0;
}

static size_t put_string(unsigned char *out, const char *text)
{
    size_t length = strlen(text);
    out[0] = (unsigned char)(length >> 8);
    out[1] = (unsigned char)(length & 0xff);
    memcpy(out + 2, text, length);
    return length + 2;
}

/* Fixed header + remaining length (< 16384: our CONNECT and SUBSCRIBE are small). */
static size_t put_header(unsigned char *out, unsigned char first, size_t remaining)
{
    out[0] = first;
    if (remaining < 128) {
        out[1] = (unsigned char)remaining;
        return 2;
    }
    out[1] = (unsigned char)((remaining & 0x7f) | 0x80);
    out[2] = (unsigned char)(remaining >> 7);
    return 3;
}

static int connect_to(const char *host, const char *port)
{
    struct addrinfo hints = {0}, *found = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &found) != 0)
        return -1;
    int fd = -1;
    for (struct addrinfo *a = found; a != NULL && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(found);
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        /* A SIGTERM landing between the loop's check and recv() would otherwise wait for the
         * next message; with this, recv() returns within 200 ms and the loop sees it. */
        struct timeval timeout = {0, 200000};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    }
    return fd;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT TOPIC CLIENT_ID\n", argv[0]);
        return 2;
    }
    const char *topic = argv[3], *client_id = argv[4];
    if (strlen(topic) > 4000 || strlen(client_id) > 4000)
        return die("topic or client id too long");

    struct sigaction action = {0};
    action.sa_handler = on_signal; /* no SA_RESTART: a blocked recv() returns EINTR */
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);
    static char out_buffer[BUFFER_SIZE];
    setvbuf(stdout, out_buffer, _IOFBF, sizeof out_buffer);

    int fd = connect_to(argv[1], argv[2]);
    if (fd < 0)
        return die("cannot connect");

    unsigned char packet[8300], body[8300];
    size_t n = put_string(body, "MQTT");
    body[n++] = 4;    /* protocol level: 3.1.1 */
    body[n++] = 0x02; /* clean session */
    body[n++] = 0;    /* keepalive 0: off */
    body[n++] = 0;
    n += put_string(body + n, client_id);
    size_t h = put_header(packet, 0x10, n);
    memcpy(packet + h, body, n);
    if (send_all(fd, packet, h + n) != 0)
        return die("cannot send CONNECT");

    n = 0;
    body[n++] = 0; /* packet id 1 */
    body[n++] = 1;
    n += put_string(body + n, topic);
    body[n++] = 0; /* requested QoS 0 */
    h = put_header(packet, 0x82, n);
    memcpy(packet + h, body, n);
    if (send_all(fd, packet, h + n) != 0)
        return die("cannot send SUBSCRIBE");

    unsigned char *buffer = malloc(BUFFER_SIZE);
    if (buffer == NULL)
        return die("out of memory");
    size_t filled = 0;
    int connacked = 0;
    while (!stopping) {
        ssize_t got = recv(fd, buffer + filled, BUFFER_SIZE - filled, 0);
        if (got < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (got < 0)
            return die("recv failed");
        if (got == 0)
            return die("the broker closed the connection");
        filled += (size_t)got;
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);

        size_t at = 0;
        while (at < filled) {
            /* Fixed header: type/flags byte, then 1-4 bytes of remaining length. */
            size_t remaining = 0, position = at + 1;
            int shift = 0, complete_length = 0;
            while (position < filled && shift <= 21) {
                unsigned char digit = buffer[position++];
                remaining |= (size_t)(digit & 0x7f) << shift;
                shift += 7;
                if (!(digit & 0x80)) {
                    complete_length = 1;
                    break;
                }
            }
            if (!complete_length) {
                if (shift > 21)
                    return die("malformed remaining length");
                break; /* the rest of the header is in the next read */
            }
            if (remaining > BUFFER_SIZE / 2)
                return die("packet larger than the observer's buffer");
            if (position + remaining > filled)
                break; /* the rest of the packet is in the next read */
            unsigned char type = buffer[at] >> 4;
            const unsigned char *p = buffer + position;
            if (type == 3) { /* PUBLISH */
                int qos = (buffer[at] >> 1) & 3;
                if (qos != 0)
                    return die("PUBLISH at QoS > 0 on a QoS 0 subscription");
                if (remaining < 2)
                    return die("malformed PUBLISH");
                size_t topic_length = ((size_t)p[0] << 8) | p[1];
                if (2 + topic_length > remaining)
                    return die("malformed PUBLISH topic");
                printf("%ld.%09ld ", (long)now.tv_sec, (long)now.tv_nsec);
                fwrite(p + 2 + topic_length, 1, remaining - 2 - topic_length, stdout);
                putchar('\n');
            } else if (type == 2) { /* CONNACK */
                if (remaining != 2 || p[1] != 0)
                    return die("CONNECT refused");
                connacked = 1;
            } else if (type == 9) { /* SUBACK */
                if (!connacked || remaining != 3 || p[2] != 0)
                    return die("SUBSCRIBE refused or not granted QoS 0");
            }
            at = position + remaining;
        }
        memmove(buffer, buffer + at, filled - at);
        filled -= at;
        fflush(stdout);
        if ((size_t)got < BATCH_BYTES) {
            /* Let messages accumulate: see PAUSE_NS. */
            struct timespec pause = {0, PAUSE_NS};
            nanosleep(&pause, NULL);
        }
    }
    fflush(stdout);
    static const unsigned char disconnect[2] = {0xe0, 0x00};
    send_all(fd, disconnect, sizeof disconnect);
    close(fd);
    return 0;
}
