/* HBONE's TLS I/O in C: OpenSSL records moved between a TCP socket and
 * Python with few copies, few syscalls and the interpreter lock released.
 *
 * Python's ssl module configures the connection (SSLContext: certificates,
 * verification, TLS 1.3 only) and creates the SSL object (SSLContext.wrap_bio
 * with two MemoryBIOs).  This module takes that SSL object's OpenSSL handle
 * and replaces its memory BIOs with one side of a BIO pair whose other side
 * it moves to and from the socket itself:
 *
 *   receive: read(2) straight into the pair's free space (BIO_nwrite0), up
 *            to the pair's size per syscall; SSL_read_ex decrypts into one
 *            bytes object per call.
 *   send:    SSL_write_ex encrypts into the pair; write(2) straight from the
 *            pair's pending records (BIO_nread0), up to its size per syscall.
 *
 * Against the event loop's TLS (memory BIOs that Python copies into and out
 * of, a bytes object per BIO read) that is two copies less per byte, and
 * against OpenSSL on the socket (agent/tunnel/tlssock.py's "socket" path: a
 * write(2) per 16 KiB record, two read(2)s per record) a sixteenth of the
 * syscalls.  Nothing else changes: same handshake, same records on the wire,
 * and the Python SSL object still answers getpeercert(), cipher(), version().
 *
 * Reaching the handle: an ssl.SSLObject's `_sslobj` is CPython's
 * _ssl._SSLSocket, whose struct starts {PyObject_HEAD; PyObject *Socket;
 * SSL *ssl; ...} in every CPython from 3.7 to 3.13.  That layout is private,
 * so `Core()` proves it before trusting it: the object's type is
 * _ssl._SSLSocket, and the pointer found there is an SSL whose read BIO
 * holds exactly the marker bytes the caller just wrote into its incoming
 * MemoryBIO (and whose role is the one asked for).  Any mismatch raises
 * TypeError and the connection fails.  The module does not build for a
 * CPython outside 3.7-3.13, and refuses to load when the ssl module runs
 * another OpenSSL than the one this module is linked to (a Python built
 * with its own OpenSSL: the handle would belong to a different library).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <string.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x03070000 || PY_VERSION_HEX >= 0x030E0000
#error "the _ssl._SSLSocket layout this module reads is known for CPython 3.7-3.13 only"
#endif

typedef struct {
    PyObject_HEAD
    PyObject *sslobj;   /* the _ssl._SSLSocket: owns the SSL (and our internal BIO) */
    SSL *ssl;
    BIO *net;           /* our side of the pair */
    int fd;
    int eof;            /* the socket's read side is at EOF */
    int busy;           /* a call is running without the GIL (one at a time) */
} Core;

typedef struct {        /* CPython's PySSLSocket, as far as this module reads it */
    PyObject_HEAD
    PyObject *Socket;
    SSL *ssl;
} PySSLSocketHead;

static PyObject *ssl_error;   /* ssl.SSLError */

/* -- moving records between the pair and the socket (no Python calls) ------ */

/* Core_read: after a short socket read, stop once this much or less has
 * been decrypted (a TLS record's plaintext at most: a message) */
#define SHORT_READ_STOP (16 * 1024)

/* Write pending records to the socket.  0: all written; 1: the socket would
 * block with records left; -1: errno set. */
static int flush_net(Core *c)
{
    for (;;) {
        char *p;
        int n = BIO_nread0(c->net, &p);
        if (n <= 0)
            return 0;
        ssize_t w = write(c->fd, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 1;
            return -1;
        }
        BIO_nread(c->net, &p, (int)w);
    }
}

/* Read from the socket into the pair's free space.  1: bytes came; 0: the
 * socket would block (or the pair is full); 2: EOF; -1: errno set.
 * `drained` (may be NULL) is set when the bytes came from a read shorter
 * than the room offered: the socket had nothing more at that moment. */
static int fill_net(Core *c, int *drained)
{
    if (c->eof)
        return 2;
    char *p;
    int room = BIO_nwrite0(c->net, &p);
    if (room <= 0)
        return 0;
    for (;;) {
        ssize_t r = read(c->fd, p, (size_t)room);
        if (r > 0) {
            BIO_nwrite(c->net, &p, (int)r);
            if (drained)
                *drained = r < room;
            return 1;
        }
        if (r == 0) {
            c->eof = 1;
            return 2;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return -1;
    }
}

/* -- errors -------------------------------------------------------------- */

static PyObject *raise_ssl(const char *what)
{
    unsigned long e = ERR_get_error();
    char buf[256];
    if (e)
        ERR_error_string_n(e, buf, sizeof buf);
    else
        snprintf(buf, sizeof buf, "unknown error");
    ERR_clear_error();
    PyErr_Format(ssl_error, "%s: %s", what, buf);
    return NULL;
}

static PyObject *raise_errno(int err)
{
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* -- Core ------------------------------------------------------------------ */

static void Core_dealloc(Core *c)
{
    if (c->net)
        BIO_free(c->net);
    Py_XDECREF(c->sslobj);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int Core_init(Core *c, PyObject *args, PyObject *kw)
{
    static char *names[] = {"sslobj", "fd", "marker", "server_side", "bufsize", NULL};
    PyObject *sslobj;
    int fd, server_side;
    Py_buffer marker;
    Py_ssize_t bufsize = 256 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oiy*p|n", names, &sslobj, &fd, &marker,
                                     &server_side, &bufsize))
        return -1;
    int ok = 0;
    if (c->ssl) {
        PyErr_SetString(PyExc_RuntimeError, "Core already initialised");
        goto out;
    }
    const char *tname = Py_TYPE(sslobj)->tp_name;
    if (strcmp(tname, "_ssl._SSLSocket") != 0) {
        PyErr_Format(PyExc_TypeError, "expected _ssl._SSLSocket, got %s", tname);
        goto out;
    }
    if (bufsize < 17 * 1024 || bufsize > (1 << 24) || marker.len < 1 || marker.len > 64) {
        PyErr_SetString(PyExc_ValueError, "bufsize or marker out of range");
        goto out;
    }
    SSL *ssl = ((PySSLSocketHead *)sslobj)->ssl;
    BIO *rbio = ssl ? SSL_get_rbio(ssl) : NULL;
    char seen[64];
    if (!rbio || BIO_method_type(rbio) != BIO_TYPE_MEM
        || (Py_ssize_t)BIO_ctrl_pending(rbio) != marker.len
        || SSL_is_server(ssl) != server_side) {
        PyErr_SetString(PyExc_TypeError,
                        "the SSL object's layout is not the one this module knows");
        goto out;
    }
    /* the marker is taken out: that BIO leaves the SSL below anyway */
    if (BIO_read(rbio, seen, (int)marker.len) != (int)marker.len
        || memcmp(seen, marker.buf, (size_t)marker.len) != 0) {
        PyErr_SetString(PyExc_TypeError, "the SSL object's read BIO does not hold the marker");
        goto out;
    }
    BIO *internal = NULL, *net = NULL;
    if (!BIO_new_bio_pair(&internal, (size_t)bufsize, &net, (size_t)bufsize)) {
        raise_ssl("BIO_new_bio_pair");
        goto out;
    }
    /* the SSL takes our one reference to `internal` as both rbio and wbio,
     * and lets go of the MemoryBIOs (Python's objects hold their own) */
    SSL_set_bio(ssl, internal, internal);
    SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    Py_INCREF(sslobj);
    c->sslobj = sslobj;
    c->ssl = ssl;
    c->net = net;
    c->fd = fd;
    ok = 1;
out:
    PyBuffer_Release(&marker);
    return ok ? 0 : -1;
}

/* Every method that runs without the GIL enters here first: one call at a
 * time per connection (each connection belongs to one event loop; a second
 * thread calling in is a bug, reported instead of corrupting the SSL). */
static int enter(Core *c)
{
    if (!c->ssl) {
        PyErr_SetString(PyExc_ValueError, "Core not initialised");
        return 0;
    }
    if (c->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Core used from two threads at once");
        return 0;
    }
    c->busy = 1;
    return 1;
}

static PyObject *leave(Core *c, PyObject *result)
{
    c->busy = 0;
    return result;
}

/* handshake() -> 0 done, 1 wants the socket readable, 2 wants it writable */
static PyObject *Core_handshake(Core *c, PyObject *Py_UNUSED(unused))
{
    if (!enter(c))
        return NULL;
    int rc, err, io = 0, saved = 0, result = -1;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        ERR_clear_error();
        rc = SSL_do_handshake(c->ssl);
        err = rc == 1 ? SSL_ERROR_NONE : SSL_get_error(c->ssl, rc);
        io = flush_net(c);
        if (io < 0) { saved = errno; break; }
        if (err == SSL_ERROR_NONE) { result = io == 1 ? 2 : 0; break; }
        if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) { result = -1; break; }
        if (io == 1) { result = 2; break; }
        io = fill_net(c, NULL);
        if (io < 0) { saved = errno; break; }
        if (io == 2) { result = -2; break; }
        if (io == 0) { result = 1; break; }
    }
    Py_END_ALLOW_THREADS
    if (saved)
        return leave(c, raise_errno(saved));
    if (result == -1)
        return leave(c, raise_ssl("TLS handshake"));
    if (result == -2) {
        PyErr_SetString(PyExc_ConnectionResetError, "peer closed the connection in the TLS handshake");
        return leave(c, NULL);
    }
    return leave(c, PyLong_FromLong(result));
}

/* read(max) -> (bytes, state): state 0 the socket would block, 1 the peer
 * closed (close_notify or TCP EOF), 2 `max` reached with more maybe there. */
static PyObject *Core_read(Core *c, PyObject *arg)
{
    Py_ssize_t max = PyLong_AsSsize_t(arg);
    if (max <= 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "max must be positive");
        return NULL;
    }
    if (!enter(c))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, max);
    if (!out)
        return leave(c, NULL);
    char *buf = PyBytes_AS_STRING(out);
    Py_ssize_t total = 0;
    int state = 0, saved = 0, sslerr = 0, drained = 0;
    Py_BEGIN_ALLOW_THREADS
    while (total < max) {
        size_t got = 0;
        ERR_clear_error();
        int rc = SSL_read_ex(c->ssl, buf + total, (size_t)(max - total), &got);
        if (rc == 1) {
            total += (Py_ssize_t)got;
            continue;
        }
        int err = SSL_get_error(c->ssl, rc);
        if (err == SSL_ERROR_ZERO_RETURN) { state = 1; break; }
        if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) {
            if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 && c->eof) { state = 1; break; }
            sslerr = 1;
            break;
        }
        /* TCP EOF, and every whole record the pair held already read: the
         * peer is gone (without close_notify: what the socket path's
         * suppress_ragged_eofs reports as well; h2 knows a cut stream) */
        if (c->eof) { state = 1; break; }
        /* post-handshake messages (TLS 1.3 tickets, key updates) may have
         * queued records of our own: they go out first */
        int io = flush_net(c);
        if (io < 0) { saved = errno; break; }
        /* The last read was short (the socket was empty then) and every
         * whole record since is read.  If this call has brought less than a
         * record's worth, it is a message, not a stream: nothing more is on
         * its way until we answer, and a second read would only say EAGAIN
         * (one read syscall per message instead of two).  After more, the
         * sender is streaming, and bytes may well have arrived while we
         * decrypted: read again, as before this rule (same-run A/Bs of
         * stopping there too could not tell bulk throughput apart from
         * their A/A band, README).  The loop polls level-triggered: bytes
         * left behind wake it again. */
        if (drained && total < SHORT_READ_STOP)
            break;
        io = fill_net(c, &drained);
        if (io < 0) { saved = errno; break; }
        if (io == 0) break;
        /* 1: bytes came; 2: EOF came, the pair's records are read first */
    }
    if (total >= max && state == 0)
        state = 2;
    Py_END_ALLOW_THREADS
    if (saved || sslerr) {
        Py_DECREF(out);
        return leave(c, saved ? raise_errno(saved) : raise_ssl("TLS read"));
    }
    if (total < max && _PyBytes_Resize(&out, total) < 0)
        return leave(c, NULL);
    return leave(c, Py_BuildValue("(Ni)", out, state));
}

/* write(pieces) -> (taken, blocked): encrypts the pieces in order and
 * writes the records to the socket until it would block.  `taken` bytes of
 * the pieces, from the first, are OpenSSL's now; `blocked`: the socket
 * would block, with records or pieces left (the rest is for the next call,
 * once the socket is writable). */
static PyObject *Core_write(Core *c, PyObject *pieces)
{
    PyObject *seq = PySequence_Fast(pieces, "write() takes a sequence of buffers");
    if (!seq)
        return NULL;
    if (!enter(c)) {
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_buffer *views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
    if (!views) {
        Py_DECREF(seq);
        return leave(c, PyErr_NoMemory());
    }
    Py_ssize_t got = 0;
    for (; got < n; got++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &views[got], PyBUF_SIMPLE) < 0)
            break;
    PyObject *result = NULL;
    if (got == n) {
        Py_ssize_t whole = 0, offset = 0, taken = 0;
        int saved = 0, sslerr = 0, blocked = 0, stuck = 0;
        Py_BEGIN_ALLOW_THREADS
        while (whole < n && !blocked) {
            const char *p = (const char *)views[whole].buf + offset;
            size_t left = (size_t)(views[whole].len - offset);
            if (left == 0) { whole++; offset = 0; continue; }
            size_t wrote = 0;
            ERR_clear_error();
            int rc = SSL_write_ex(c->ssl, p, left, &wrote);
            if (rc == 1) {
                stuck = 0;
                taken += (Py_ssize_t)wrote;
                offset += (Py_ssize_t)wrote;
                if ((size_t)wrote == left) { whole++; offset = 0; }
                continue;
            }
            int err = SSL_get_error(c->ssl, rc);
            if (err != SSL_ERROR_WANT_WRITE && err != SSL_ERROR_WANT_READ) { sslerr = 1; break; }
            size_t before = BIO_ctrl_pending(c->net);
            int io = flush_net(c);   /* the pair is full: make room */
            if (io < 0) { saved = errno; break; }
            if (io == 1) blocked = 1;
            else if (before == 0 && ++stuck > 1) { sslerr = 2; break; }  /* no room made, none needed */
        }
        if (!saved && !sslerr && !blocked) {
            int io = flush_net(c);
            if (io < 0) saved = errno;
            blocked = io == 1;
        }
        Py_END_ALLOW_THREADS
        if (saved)
            raise_errno(saved);
        else if (sslerr == 2)
            PyErr_SetString(ssl_error, "TLS write: OpenSSL wants I/O that is not pending");
        else if (sslerr)
            raise_ssl("TLS write");
        else
            result = Py_BuildValue("(nO)", taken, blocked ? Py_True : Py_False);
    }
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_DECREF(seq);
    return leave(c, result);
}

/* Records made so far written to the socket, after a close_notify when
 * `shutdown`: True when all of them are on it. */
static PyObject *flush_call(Core *c, int shutdown)
{
    if (!enter(c))
        return NULL;
    int io, saved = 0;
    Py_BEGIN_ALLOW_THREADS
    if (shutdown) {
        ERR_clear_error();
        (void)SSL_shutdown(c->ssl);   /* 0: sent, the peer's not awaited */
        ERR_clear_error();
    }
    io = flush_net(c);
    if (io < 0) saved = errno;
    Py_END_ALLOW_THREADS
    if (saved)
        return leave(c, raise_errno(saved));
    return leave(c, PyBool_FromLong(io == 0));
}

/* flush() -> True when every record made so far is on the socket */
static PyObject *Core_flush(Core *c, PyObject *Py_UNUSED(unused))
{
    return flush_call(c, 0);
}

/* unsent() -> bytes of records not yet on the socket */
static PyObject *Core_unsent(Core *c, PyObject *Py_UNUSED(unused))
{
    if (!c->ssl || c->busy)
        return PyErr_Format(PyExc_RuntimeError, "Core not initialised or busy");
    return PyLong_FromSize_t(BIO_ctrl_pending(c->net));
}

/* pending() -> whether a read() could return bytes without the socket:
 * decrypted bytes in OpenSSL or records in the pair */
static PyObject *Core_pending(Core *c, PyObject *Py_UNUSED(unused))
{
    if (!c->ssl || c->busy)
        return PyErr_Format(PyExc_RuntimeError, "Core not initialised or busy");
    return PyBool_FromLong(SSL_pending(c->ssl) > 0 || BIO_ctrl_pending(SSL_get_rbio(c->ssl)) > 0);
}

/* close_notify() -> True when the alert is on the socket */
static PyObject *Core_close_notify(Core *c, PyObject *Py_UNUSED(unused))
{
    return flush_call(c, 1);
}

static PyMethodDef Core_methods[] = {
    {"handshake", (PyCFunction)Core_handshake, METH_NOARGS, NULL},
    {"read", (PyCFunction)Core_read, METH_O, NULL},
    {"write", (PyCFunction)Core_write, METH_O, NULL},
    {"flush", (PyCFunction)Core_flush, METH_NOARGS, NULL},
    {"unsent", (PyCFunction)Core_unsent, METH_NOARGS, NULL},
    {"pending", (PyCFunction)Core_pending, METH_NOARGS, NULL},
    {"close_notify", (PyCFunction)Core_close_notify, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.tunnel._tlscore.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_doc = "OpenSSL records of one TLS connection between its socket and Python.",
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_tlscore",
    .m_doc = "HBONE's TLS I/O in C (agent/tunnel/tlssock.py).", .m_size = -1,
};

PyMODINIT_FUNC PyInit__tlscore(void)
{
    PyObject *ssl = PyImport_ImportModule("ssl");
    if (!ssl)
        return NULL;
    PyObject *num = PyObject_GetAttrString(ssl, "OPENSSL_VERSION_NUMBER");
    ssl_error = PyObject_GetAttrString(ssl, "SSLError");
    Py_DECREF(ssl);
    if (!num || !ssl_error) {
        Py_XDECREF(num);
        return NULL;
    }
    unsigned long theirs = PyLong_AsUnsignedLong(num);
    Py_DECREF(num);
    /* both are the running libraries' own numbers: they differ when the ssl
     * module was linked to another OpenSSL than this module */
    if (theirs != OpenSSL_version_num() || (OPENSSL_VERSION_NUMBER >> 28) != (theirs >> 28)) {
        PyErr_Format(PyExc_ImportError,
                     "the ssl module runs OpenSSL %lx, this extension %lx (built for %lx): "
                     "rebuild it against the ssl module's OpenSSL",
                     theirs, OpenSSL_version_num(), (unsigned long)OPENSSL_VERSION_NUMBER);
        return NULL;
    }
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
