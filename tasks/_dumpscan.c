/*
 * A scanner of pg_dump custom-format archives (-Fc -Z0) as they stream past: where each data block
 * starts, and the row count and order-independent content checksum of each table's data.
 *
 * Python parses the archive's header and table of contents (tasks/archive.py) and hands everything
 * after it to a Scanner. The data section is a series of blocks:
 *
 *   BLK_DATA  (1): dumpId, then chunks [int length, bytes] ending with a zero length;
 *   BLK_BLOBS (3): dumpId, then per large object [int oid, chunks..., 0], ending with oid 0.
 *
 * An int is one sign byte followed by int_size little-endian bytes. pg_dump without compression writes
 * one chunk per COPY row, so this runs once per row: it is C because Python would cost seconds per GB.
 *
 * For each data block the scanner splits the COPY text into lines, stops at the end marker line "\.",
 * and adds XXH64(line, seed 0) of every row into a 64-bit sum (wrapping). The sum does not depend on row
 * order, and a duplicate row counts twice. Large-object blocks are skipped. With hash_rows=False only the
 * block structure is followed (the offsets pg_restore -j needs, see tasks/archive.py). Each finished block
 * reports its offsets (start, and end: one past its last byte) from the first byte fed. The GIL is released while scanning.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

#define P1 11400714785074694791ULL
#define P2 14029467366897019727ULL
#define P3 1609587929392839161ULL
#define P4 9650029242287828579ULL
#define P5 2870177450012600261ULL

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t read64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t read32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t xround(uint64_t acc, uint64_t input) { return rotl64(acc + input * P2, 31) * P1; }
static inline uint64_t xmerge(uint64_t acc, uint64_t val) { acc ^= xround(0, val); return acc * P1 + P4; }

/* XXH64 of the bytes still in mem (< 32) plus the accumulated state. */
static uint64_t xfinish(uint64_t h, const uint8_t *p, size_t len)
{
    while (len >= 8) { h ^= xround(0, read64(p)); h = rotl64(h, 27) * P1 + P4; p += 8; len -= 8; }
    if (len >= 4) { h ^= (uint64_t)read32(p) * P1; h = rotl64(h, 23) * P2 + P3; p += 4; len -= 4; }
    while (len > 0) { h ^= (*p) * P5; h = rotl64(h, 11) * P1; p++; len--; }
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

typedef struct { uint64_t v1, v2, v3, v4, total; uint8_t mem[32]; size_t memsize; } xstate;

static void xreset(xstate *s) { s->v1 = P1 + P2; s->v2 = P2; s->v3 = 0; s->v4 = (uint64_t)0 - P1; s->total = 0; s->memsize = 0; }

static const uint8_t *xstripes(uint64_t *v, const uint8_t *p, const uint8_t *limit)
{
    uint64_t v1 = v[0], v2 = v[1], v3 = v[2], v4 = v[3];
    do {
        v1 = xround(v1, read64(p)); v2 = xround(v2, read64(p + 8));
        v3 = xround(v3, read64(p + 16)); v4 = xround(v4, read64(p + 24));
        p += 32;
    } while (p <= limit);
    v[0] = v1; v[1] = v2; v[2] = v3; v[3] = v4;
    return p;
}

static void xupdate(xstate *s, const uint8_t *p, size_t len)
{
    const uint8_t *end = p + len;
    uint64_t v[4] = {s->v1, s->v2, s->v3, s->v4};
    s->total += len;
    if (s->memsize + len < 32) { memcpy(s->mem + s->memsize, p, len); s->memsize += len; return; }
    if (s->memsize) {
        size_t fill = 32 - s->memsize;
        memcpy(s->mem + s->memsize, p, fill);
        xstripes(v, s->mem, s->mem);
        p += fill; s->memsize = 0;
    }
    if (p + 32 <= end) p = xstripes(v, p, end - 32);
    if (p < end) { memcpy(s->mem, p, (size_t)(end - p)); s->memsize = (size_t)(end - p); }
    s->v1 = v[0]; s->v2 = v[1]; s->v3 = v[2]; s->v4 = v[3];
}

static uint64_t xdigest(const xstate *s)
{
    uint64_t h;
    if (s->total >= 32) {
        h = rotl64(s->v1, 1) + rotl64(s->v2, 7) + rotl64(s->v3, 12) + rotl64(s->v4, 18);
        h = xmerge(h, s->v1); h = xmerge(h, s->v2); h = xmerge(h, s->v3); h = xmerge(h, s->v4);
    } else {
        h = P5;
    }
    h += s->total;
    return xfinish(h, s->mem, s->memsize);
}

static uint64_t xxh64(const uint8_t *p, size_t len)
{
    xstate s;
    xreset(&s);
    xupdate(&s, p, len);
    return xdigest(&s);
}

/* --- the block parser ---------------------------------------------------------------------------- */

enum { S_BLOCK_TYPE, S_INT, S_CHUNK, S_FAILED };
enum { I_DUMP_ID, I_CHUNK_LEN, I_BLOB_OID, I_BLOB_CHUNK_LEN };

typedef struct { int64_t dump_id; uint64_t rows; uint64_t sum; int is_data; uint64_t start; uint64_t end; } result_t;

typedef struct {
    PyObject_HEAD
    int int_size;
    int hash_rows;
    uint64_t block_start;
    int state;
    int int_purpose;
    int int_pos;
    uint8_t int_buf[16];
    int block_type;
    int64_t dump_id;
    uint64_t chunk_left;
    /* the COPY line being read */
    xstate line;
    size_t line_len;
    uint8_t line_head[2];
    int copy_done;
    uint64_t rows;
    uint64_t sum;
    /* blocks finished during one feed() */
    result_t *done;
    size_t done_len, done_cap;
    char error[160];
    uint64_t offset;
} Scanner;

static int push_done(Scanner *s)
{
    if (s->done_len == s->done_cap) {
        size_t cap = s->done_cap ? s->done_cap * 2 : 16;
        result_t *grown = PyMem_RawRealloc(s->done, cap * sizeof(result_t));
        if (!grown) { snprintf(s->error, sizeof s->error, "out of memory"); return -1; }
        s->done = grown; s->done_cap = cap;
    }
    s->done[s->done_len].dump_id = s->dump_id;
    s->done[s->done_len].rows = s->rows;
    s->done[s->done_len].sum = s->sum;
    s->done[s->done_len].is_data = s->block_type == 1;
    s->done[s->done_len].start = s->block_start;
    s->done[s->done_len].end = s->offset;  /* the block's last int has been consumed */
    s->done_len++;
    return 0;
}

static void end_line(Scanner *s)
{
    if (s->copy_done) return;
    if (s->line_len == 2 && s->line_head[0] == '\\' && s->line_head[1] == '.') { s->copy_done = 1; return; }
    s->sum += xdigest(&s->line);
    s->rows++;
}

/* Row data of one chunk (or part of it). */
static void scan_rows(Scanner *s, const uint8_t *p, size_t len)
{
    const uint8_t *end = p + len;
    if (s->copy_done) return;
    while (p < end) {
        const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
        size_t piece = nl ? (size_t)(nl - p) : (size_t)(end - p);
        if (s->line_len == 0 && nl) {
            /* a whole line in view: the common case, hashed in one call */
            if (piece == 2 && p[0] == '\\' && p[1] == '.') { s->copy_done = 1; return; }
            s->sum += xxh64(p, piece);
            s->rows++;
        } else {
            for (size_t i = 0; i < piece && s->line_len + i < 2; i++) s->line_head[s->line_len + i] = p[i];
            if (s->line_len == 0) xreset(&s->line);
            xupdate(&s->line, p, piece);
            s->line_len += piece;
            if (nl) {
                end_line(s);
                s->line_len = 0;
                if (s->copy_done) return;
            }
        }
        p += piece + (nl ? 1 : 0);
    }
}

static int64_t int_value(Scanner *s)
{
    uint64_t v = 0;
    for (int i = s->int_size - 1; i >= 0; i--) v = (v << 8) | s->int_buf[1 + i];
    return s->int_buf[0] ? -(int64_t)v : (int64_t)v;
}

static void expect_int(Scanner *s, int purpose) { s->state = S_INT; s->int_purpose = purpose; s->int_pos = 0; }

static int fail(Scanner *s, const char *what)
{
    snprintf(s->error, sizeof s->error, "%s at archive data offset %llu", what, (unsigned long long)s->offset);
    s->state = S_FAILED;
    return -1;
}

static int start_block(Scanner *s)
{
    s->rows = 0; s->sum = 0; s->copy_done = 0; s->line_len = 0;
    return 0;
}

static int got_int(Scanner *s)
{
    int64_t v = int_value(s);
    switch (s->int_purpose) {
    case I_DUMP_ID:
        if (v <= 0) return fail(s, "bad dump id");
        s->dump_id = v;
        start_block(s);
        expect_int(s, s->block_type == 1 ? I_CHUNK_LEN : I_BLOB_OID);
        return 0;
    case I_CHUNK_LEN:
    case I_BLOB_CHUNK_LEN:
        if (v < 0) return fail(s, "negative chunk length");
        if (v == 0) {
            if (s->int_purpose == I_BLOB_CHUNK_LEN) { expect_int(s, I_BLOB_OID); return 0; }
            if (s->line_len && !s->copy_done) end_line(s);  /* a last line without newline */
            s->line_len = 0;
            if (push_done(s) < 0) { s->state = S_FAILED; return -1; }
            s->state = S_BLOCK_TYPE;
            return 0;
        }
        s->chunk_left = (uint64_t)v;
        s->state = S_CHUNK;
        return 0;
    case I_BLOB_OID:
        if (v == 0) {
            if (push_done(s) < 0) { s->state = S_FAILED; return -1; }
            s->state = S_BLOCK_TYPE;
            return 0;
        }
        expect_int(s, I_BLOB_CHUNK_LEN);
        return 0;
    }
    return fail(s, "internal state");
}

static int scan(Scanner *s, const uint8_t *p, size_t len)
{
    const uint8_t *end = p + len;
    while (p < end) {
        switch (s->state) {
        case S_BLOCK_TYPE:
            if (*p != 1 && *p != 3) return fail(s, "unknown block type");
            s->block_type = *p;
            s->block_start = s->offset;
            p++; s->offset++;
            expect_int(s, I_DUMP_ID);
            break;
        case S_INT: {
            size_t want = (size_t)(1 + s->int_size - s->int_pos);
            size_t take = (size_t)(end - p) < want ? (size_t)(end - p) : want;
            memcpy(s->int_buf + s->int_pos, p, take);
            s->int_pos += (int)take; p += take; s->offset += take;
            if (s->int_pos == 1 + s->int_size && got_int(s) < 0) return -1;
            break;
        }
        case S_CHUNK: {
            size_t take = (uint64_t)(end - p) < s->chunk_left ? (size_t)(end - p) : (size_t)s->chunk_left;
            if (s->block_type == 1 && s->hash_rows) scan_rows(s, p, take);
            p += take; s->offset += take; s->chunk_left -= take;
            if (s->chunk_left == 0) expect_int(s, s->int_purpose == I_BLOB_CHUNK_LEN ? I_BLOB_CHUNK_LEN : I_CHUNK_LEN);
            break;
        }
        default:
            return -1;
        }
    }
    return 0;
}

/* --- Python type --------------------------------------------------------------------------------- */

static int Scanner_init(Scanner *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"int_size", "hash_rows", NULL};
    int int_size, hash_rows = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|p", kwlist, &int_size, &hash_rows)) return -1;
    if (int_size < 1 || int_size > 8) { PyErr_SetString(PyExc_ValueError, "int_size must be 1..8"); return -1; }
    self->int_size = int_size;
    self->hash_rows = hash_rows;
    self->block_start = 0;
    self->state = S_BLOCK_TYPE;
    self->done = NULL; self->done_len = 0; self->done_cap = 0;
    self->error[0] = 0;
    self->offset = 0;
    return 0;
}

static void Scanner_dealloc(Scanner *self)
{
    PyMem_RawFree(self->done);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Scanner_feed(Scanner *self, PyObject *arg)
{
    Py_buffer view;
    int rc;
    if (self->state == S_FAILED) { PyErr_SetString(PyExc_ValueError, self->error); return NULL; }
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    self->done_len = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = scan(self, (const uint8_t *)view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (rc < 0) { PyErr_SetString(PyExc_ValueError, self->error); return NULL; }
    PyObject *out = PyList_New((Py_ssize_t)self->done_len);
    if (!out) return NULL;
    for (size_t i = 0; i < self->done_len; i++) {
        result_t *r = &self->done[i];
        PyObject *item = Py_BuildValue("(LKKOKK)", (long long)r->dump_id, (unsigned long long)r->rows,
                                       (unsigned long long)r->sum, r->is_data ? Py_True : Py_False,
                                       (unsigned long long)r->start, (unsigned long long)r->end);
        if (!item) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    return out;
}

static PyObject *Scanner_between_blocks(Scanner *self, void *closure)
{
    return PyBool_FromLong(self->state == S_BLOCK_TYPE);
}

static PyObject *py_xxh64(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t h = xxh64((const uint8_t *)view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(h);
}

/* --- COPY TO STDOUT read straight from libpq --------------------------------------------------------- */

/* The few libpq calls used, looked up at run time in the libpq the PostgreSQL client tools use (no
 * headers or link step needed to build this module). Their ABI is libpq's stable public one. */
typedef struct pg_conn PGconn;
typedef struct pg_result PGresult;
static struct {
    int loaded;
    PGconn *(*connectdbParams)(const char *const *keywords, const char *const *values, int expand_dbname);
    int (*status)(const PGconn *conn);
    char *(*errorMessage)(const PGconn *conn);
    PGresult *(*exec)(PGconn *conn, const char *query);
    int (*resultStatus)(const PGresult *res);
    char *(*resultErrorMessage)(const PGresult *res);
    int (*getCopyData)(PGconn *conn, char **buffer, int async);
    PGresult *(*getResult)(PGconn *conn);
    void (*freemem)(void *ptr);
    void (*clear)(PGresult *res);
    void (*finish)(PGconn *conn);
} pq;

enum { PQ_CONNECTION_OK = 0, PQ_PGRES_COMMAND_OK = 1, PQ_PGRES_COPY_OUT = 3 };

static int load_libpq(const char *path)
{
    if (pq.loaded) return 0;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) return -1;
#define PQ_SYM(field, name) if (!(*(void **)&pq.field = dlsym(h, name))) return -1;
    PQ_SYM(connectdbParams, "PQconnectdbParams") PQ_SYM(status, "PQstatus") PQ_SYM(errorMessage, "PQerrorMessage")
    PQ_SYM(exec, "PQexec") PQ_SYM(resultStatus, "PQresultStatus") PQ_SYM(resultErrorMessage, "PQresultErrorMessage")
    PQ_SYM(getCopyData, "PQgetCopyData") PQ_SYM(getResult, "PQgetResult") PQ_SYM(freemem, "PQfreemem")
    PQ_SYM(clear, "PQclear") PQ_SYM(finish, "PQfinish")
#undef PQ_SYM
    pq.loaded = 1;
    return 0;
}

static PyObject *ConnectError, *CopyError;

/* copy_digest(libpq, keywords, values, statement) -> (rows, sum): connects with the given libpq keywords
 * (the password among them, never in an environment or argv), runs one COPY ... TO STDOUT and hashes
 * every row as the scanner hashes a table's data block. The GIL is released throughout. Raises OSError
 * when libpq cannot be loaded, ConnectError or CopyError with libpq's message otherwise. */
static PyObject *py_copy_digest(PyObject *module, PyObject *args)
{
    const char *libpath, *statement;
    PyObject *kw_list, *val_list;
    if (!PyArg_ParseTuple(args, "sO!O!s", &libpath, &PyList_Type, &kw_list, &PyList_Type, &val_list, &statement))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(kw_list);
    if (PyList_GET_SIZE(val_list) != n) { PyErr_SetString(PyExc_ValueError, "keywords and values differ in length"); return NULL; }
    if (load_libpq(libpath) < 0) {
        const char *why = dlerror();
        PyErr_Format(PyExc_OSError, "cannot load %s: %s", libpath, why ? why : "a libpq function is missing");
        return NULL;
    }
    const char **keywords = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    const char **values = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (!keywords || !values) { PyMem_Free(keywords); PyMem_Free(values); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < n; i++) {
        keywords[i] = PyUnicode_AsUTF8(PyList_GET_ITEM(kw_list, i));
        values[i] = PyUnicode_AsUTF8(PyList_GET_ITEM(val_list, i));
        if (!keywords[i] || !values[i]) { PyMem_Free(keywords); PyMem_Free(values); return NULL; }
    }
    Scanner s;
    memset(&s, 0, sizeof s);
    char message[1024];
    message[0] = 0;
    PyObject *error_type = NULL;
    Py_BEGIN_ALLOW_THREADS
    PGconn *conn = pq.connectdbParams(keywords, values, 0);
    if (!conn || pq.status(conn) != PQ_CONNECTION_OK) {
        snprintf(message, sizeof message, "%s", conn ? pq.errorMessage(conn) : "out of memory");
        error_type = ConnectError;
    } else {
        PGresult *res = pq.exec(conn, statement);
        if (pq.resultStatus(res) != PQ_PGRES_COPY_OUT) {
            /* no result at all (the connection broke): the connection's message says why */
            const char *why = res ? pq.resultErrorMessage(res) : "";
            snprintf(message, sizeof message, "%s", *why ? why : pq.errorMessage(conn));
            error_type = CopyError;
        }
        pq.clear(res);
        if (!error_type) {
            char *buffer;
            int len;
            while ((len = pq.getCopyData(conn, &buffer, 0)) > 0) {
                scan_rows(&s, (const uint8_t *)buffer, (size_t)len);
                pq.freemem(buffer);
            }
            if (len == -2) {
                snprintf(message, sizeof message, "%s", pq.errorMessage(conn));
                error_type = CopyError;
            }
            while ((res = pq.getResult(conn)) != NULL) {
                if (!error_type && pq.resultStatus(res) != PQ_PGRES_COMMAND_OK) {
                    snprintf(message, sizeof message, "%s", pq.resultErrorMessage(res));
                    error_type = CopyError;
                }
                pq.clear(res);
            }
            if (!error_type && s.line_len != 0) {
                snprintf(message, sizeof message, "the COPY output ended inside a row");
                error_type = CopyError;
            }
        }
    }
    if (conn) pq.finish(conn);
    Py_END_ALLOW_THREADS
    PyMem_Free(keywords);
    PyMem_Free(values);
    if (error_type) {
        size_t len = strlen(message);
        while (len && (message[len - 1] == '\n' || message[len - 1] == ' ')) message[--len] = 0;
        PyErr_SetString(error_type, message);
        return NULL;
    }
    return Py_BuildValue("(KK)", (unsigned long long)s.rows, (unsigned long long)s.sum);
}

static PyMethodDef Scanner_methods[] = {
    {"feed", (PyCFunction)Scanner_feed, METH_O,
     "feed(data) -> [(dump_id, rows, sum, is_table_data, start offset, end offset)] for the blocks that ended in data"},
    {NULL}
};

static PyGetSetDef Scanner_getset[] = {
    {"between_blocks", (getter)Scanner_between_blocks, NULL, "True when the bytes so far end a whole block", NULL},
    {NULL}
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tasks._dumpscan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Streaming parser of a custom-format archive's data blocks (after the TOC).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
    .tp_getset = Scanner_getset,
};

static PyMethodDef module_methods[] = {
    {"xxh64", py_xxh64, METH_O, "xxh64(data) -> XXH64 of data with seed 0"},
    {"copy_digest", py_copy_digest, METH_VARARGS,
     "copy_digest(libpq, keywords, values, statement) -> (rows, sum of XXH64 per row) of a COPY ... TO STDOUT"},
    {NULL}
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_dumpscan", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__dumpscan(void)
{
    if (PyType_Ready(&ScannerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    ConnectError = PyErr_NewException("tasks._dumpscan.ConnectError", NULL, NULL);
    CopyError = PyErr_NewException("tasks._dumpscan.CopyError", NULL, NULL);
    if (!ConnectError || !CopyError || PyModule_AddObject(m, "ConnectError", ConnectError) < 0
        || PyModule_AddObject(m, "CopyError", CopyError) < 0) { Py_DECREF(m); return NULL; }
    Py_INCREF(ConnectError); Py_INCREF(CopyError);
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(m, "Scanner", (PyObject *)&ScannerType) < 0) { Py_DECREF(&ScannerType); Py_DECREF(m); return NULL; }
    return m;
}
