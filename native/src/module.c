/* shmbroker._native: the only CPython-aware file of the C core.
 *
 * Each function here converts Python arguments to plain pointers and lengths (with the GIL),
 * calls the plain-C routines of native/include/shmb (without the GIL where the work is large enough to be
 * worth the switch), then builds Python results (with the GIL). The routine contract is
 * docs/design/records.md; shmbroker/records/reference.py is its pure-Python twin.
 *
 * Lifetime rule for GIL-free sections: every pointer used without the GIL points into an
 * object we hold a reference to (bytes, str: immutable) or into a Py_buffer view we hold
 * (the exporter cannot resize or free the memory while the view exists).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "shmb/accumulator.h"
#include "shmb/crc32c.h"
#include "shmb/drain.h"
#include "shmb/futex.h"
#include "shmb/murmur2.h"
#include "shmb/mutex.h"
#include "shmb/record_batch.h"
#include "shmb/ring.h"
#include "shmb/shm_atomic.h"

/* Below these sizes releasing the GIL costs more than it gives. */
#define GIL_RELEASE_BYTES_MIN 8192
/* Batches scanned per GIL-free step of scan_batches (bounded stack use). */
#define SCAN_CHUNK_BATCHES 256

/* Exceptions by SCAN status (index 0 = OK, unused). */
#define STATUS_COUNT (SHMB_RB_SCAN_TOO_LARGE + 1)

/* client.producer._Batch's slots, in its __slots__ order (checked by batch_slots_init). */
enum { B_PRODUCER, B_TOPIC, B_PARTITION, B_COUNT, B_BASE_OFFSET, B_ERROR, B_DONE, B_WRITER,
       B_SEQUENCE, B_DEADLINE, B_NSLOTS };
typedef struct {
    Py_ssize_t at[B_NSLOTS];
} BatchSlots;

/* poll_ring: the client.consumer._Fetch slots it reads or sets, and the other attributes it
 * reads (of the Consumer, its RingReads and their ControlRegion), by name. */
enum { F_RINGS, F_PENDING, F_POSITION, F_HW, F_CONTROL, F_TOPIC, F_PARTITION, F_SEEN_HW_SEQ,
       F_PENDING_END, F_RECORDS_OUT, F_NSLOTS };
/* ... and client.ring_reads.RingReads' slots. */
enum { R_CONTROL, R_BUFS, R_HINTS, R_FROMS, R_REGISTRY_SEEN, R_NSLOTS };

typedef struct {
    PyTypeObject *record_type;
    PyTypeObject *file_map_type;
    PyTypeObject *accumulator_type;
    PyTypeObject *future_base_type;
    PyTypeObject *mutex_type;
    PyObject *empty_tuple;
    PyObject *errors[STATUS_COUNT];
    PyObject *ring_corrupt_error;
    /* resolve_inflight's last batch type and its slots (batch_slots_cached): valid while
     * the type's version tag is (any change to the class's attributes bumps it). */
    PyObject *slots_type;
    unsigned int slots_tag;
    BatchSlots slots;
    /* poll_ring: client.consumer._Fetch's slot offsets (cached as slots_type is) and the
     * interned attribute names it reads. */
    PyObject *fetch_type;
    unsigned int fetch_tag;
    Py_ssize_t fetch_at[F_NSLOTS];
    PyObject *rings_type;
    unsigned int rings_tag;
    Py_ssize_t rings_at[R_NSLOTS];
    PyObject *buf_name; /* "buf" (ControlRegion.buf, read by name), interned */
} module_state;

static inline module_state *get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* Raises the shmbroker.errors class for status as cls(message, position). */
static PyObject *raise_status(module_state *st, int status, const shmb_rb_error *err)
{
    PyObject *cls = (status > 0 && status < STATUS_COUNT) ? st->errors[status] : NULL;
    if (cls == NULL) {
        PyErr_Format(PyExc_SystemError, "unexpected scan status %d", status);
        return NULL;
    }
    PyObject *exc = PyObject_CallFunction(cls, "sn", err->message, (Py_ssize_t)err->position);
    if (exc != NULL) {
        PyErr_SetObject(cls, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* ==== Record ================================================================================ */

typedef struct {
    PyObject_HEAD
    int64_t offset;
    int64_t timestamp;
    PyObject *key;     /* bytes or None */
    PyObject *value;   /* bytes or None */
    PyObject *headers; /* tuple of (str, bytes | None) */
    PyObject *topic;   /* str, or NULL (None): set when a consumer decodes a partition's log */
    int64_t partition; /* -1 when not set */
} RecordObject;

/* Records hold only bytes, str, None and tuples of those, so they cannot be part of a
 * reference cycle: the type is not GC-tracked, which keeps creating millions of them cheap. */
static void Record_dealloc(RecordObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->key);
    Py_XDECREF(self->value);
    Py_XDECREF(self->headers);
    Py_XDECREF(self->topic);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int check_bytes_or_none(PyObject *o, const char *name)
{
    if (o != Py_None && !PyBytes_CheckExact(o)) {
        PyErr_Format(PyExc_TypeError, "Record %s must be bytes or None, not %.100s", name,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static PyObject *Record_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"offset", "timestamp", "key", "value", "headers", "topic",
                             "partition", NULL};
    long long offset, timestamp, partition = -1;
    PyObject *key, *value, *headers = NULL, *topic = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LLOO|OOL:Record", kwlist, &offset, &timestamp,
                                     &key, &value, &headers, &topic, &partition))
        return NULL;
    if (check_bytes_or_none(key, "key") < 0 || check_bytes_or_none(value, "value") < 0)
        return NULL;
    if (topic != Py_None && !PyUnicode_CheckExact(topic)) {
        PyErr_Format(PyExc_TypeError, "Record topic must be str or None, not %.100s",
                     Py_TYPE(topic)->tp_name);
        return NULL;
    }
    PyObject *htuple = headers ? PySequence_Tuple(headers) : PyTuple_New(0);
    if (htuple == NULL)
        return NULL;
    /* Only (str, bytes | None) tuples: with nothing mutable inside, no cycle can form, which is
     * what lets the type stay out of the garbage collector. */
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(htuple); i++) {
        PyObject *pair = PyTuple_GET_ITEM(htuple, i);
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(pair, 0)) ||
            (PyTuple_GET_ITEM(pair, 1) != Py_None && !PyBytes_CheckExact(PyTuple_GET_ITEM(pair, 1)))) {
            PyErr_Format(PyExc_TypeError,
                         "Record headers[%zd] must be a (str, bytes | None) tuple", i);
            Py_DECREF(htuple);
            return NULL;
        }
    }
    RecordObject *self = (RecordObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(htuple);
        return NULL;
    }
    self->offset = offset;
    self->timestamp = timestamp;
    Py_INCREF(key);
    self->key = key;
    Py_INCREF(value);
    self->value = value;
    self->headers = htuple;
    self->topic = topic == Py_None ? NULL : Py_NewRef(topic);
    self->partition = partition;
    return (PyObject *)self;
}

static PyObject *Record_repr(RecordObject *self)
{
    if (self->topic != NULL)
        return PyUnicode_FromFormat("Record(topic=%R, partition=%lld, offset=%lld, timestamp=%lld, "
                                    "key=%R, value=%R, headers=%R)", self->topic,
                                    (long long)self->partition, (long long)self->offset,
                                    (long long)self->timestamp, self->key, self->value,
                                    self->headers);
    return PyUnicode_FromFormat("Record(offset=%lld, timestamp=%lld, key=%R, value=%R, headers=%R)",
                                (long long)self->offset, (long long)self->timestamp, self->key,
                                self->value, self->headers);
}

static PyObject *Record_richcompare(PyObject *a, PyObject *b, int op)
{
    if ((op != Py_EQ && op != Py_NE) || Py_TYPE(b) != Py_TYPE(a))
        Py_RETURN_NOTIMPLEMENTED;
    RecordObject *x = (RecordObject *)a, *y = (RecordObject *)b;
    int equal = x->offset == y->offset && x->timestamp == y->timestamp &&
                x->partition == y->partition;
    PyObject *const xs[4] = {x->key, x->value, x->headers, x->topic ? x->topic : Py_None};
    PyObject *const ys[4] = {y->key, y->value, y->headers, y->topic ? y->topic : Py_None};
    for (int i = 0; equal && i < 4; i++) {
        int r = PyObject_RichCompareBool(xs[i], ys[i], Py_EQ);
        if (r < 0)
            return NULL;
        equal = r;
    }
    return PyBool_FromLong(op == Py_EQ ? equal : !equal);
}

static PyObject *Record_fields(RecordObject *self)
{
    return Py_BuildValue("(LLOOO)", (long long)self->offset, (long long)self->timestamp,
                         self->key, self->value, self->headers);
}

static Py_hash_t Record_hash(RecordObject *self)
{
    PyObject *t = Record_fields(self);
    if (t == NULL)
        return -1;
    Py_hash_t h = PyObject_Hash(t);
    Py_DECREF(t);
    return h;
}

static PyObject *Record_reduce(RecordObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *fields = Py_BuildValue("(LLOOOOL)", (long long)self->offset,
                                     (long long)self->timestamp, self->key, self->value,
                                     self->headers, self->topic ? self->topic : Py_None,
                                     (long long)self->partition);
    if (fields == NULL)
        return NULL;
    return Py_BuildValue("(ON)", (PyObject *)Py_TYPE(self), fields);
}

static PyObject *Record_get_topic(RecordObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef(self->topic ? self->topic : Py_None);
}

/* TopicPartition(topic, partition), the client's named tuple (imported on first use: the
 * codec itself does not depend on the client package). */
static PyObject *Record_get_topic_partition(RecordObject *self, void *Py_UNUSED(closure))
{
    PyObject *types = PyImport_ImportModule("shmbroker.client.types");
    if (types == NULL)
        return NULL;
    PyObject *cls = PyObject_GetAttrString(types, "TopicPartition");
    Py_DECREF(types);
    if (cls == NULL)
        return NULL;
    PyObject *tp = PyObject_CallFunction(cls, "OL", self->topic ? self->topic : Py_None,
                                         (long long)self->partition);
    Py_DECREF(cls);
    return tp;
}

static PyObject *Record_get_record(RecordObject *self, void *Py_UNUSED(closure))
{
    return Py_NewRef((PyObject *)self);
}

static PyGetSetDef Record_getset[] = {
    {"topic", (getter)Record_get_topic, NULL, "topic (str), or None outside a consumer", NULL},
    {"topic_partition", (getter)Record_get_topic_partition, NULL,
     "TopicPartition(topic, partition)", NULL},
    {"record", (getter)Record_get_record, NULL,
     "the record itself (kept for code written against the earlier wrapper)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Record_members[] = {
    {"offset", T_LONGLONG, offsetof(RecordObject, offset), READONLY, "offset (int64)"},
    {"timestamp", T_LONGLONG, offsetof(RecordObject, timestamp), READONLY,
     "timestamp in ms (int64)"},
    {"key", T_OBJECT, offsetof(RecordObject, key), READONLY, "bytes or None"},
    {"value", T_OBJECT, offsetof(RecordObject, value), READONLY, "bytes or None"},
    {"headers", T_OBJECT, offsetof(RecordObject, headers), READONLY,
     "tuple of (str, bytes | None) pairs"},
    {"partition", T_LONGLONG, offsetof(RecordObject, partition), READONLY,
     "partition (int), or -1 outside a consumer"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Record_methods[] = {
    {"__reduce__", (PyCFunction)Record_reduce, METH_NOARGS, "pickle support"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Record_slots[] = {
    {Py_tp_dealloc, (void *)Record_dealloc},
    {Py_tp_new, (void *)Record_new},
    {Py_tp_repr, (void *)Record_repr},
    {Py_tp_richcompare, (void *)Record_richcompare},
    {Py_tp_hash, (void *)Record_hash},
    {Py_tp_members, (void *)Record_members},
    {Py_tp_getset, (void *)Record_getset},
    {Py_tp_methods, (void *)Record_methods},
    {Py_tp_doc, (void *)"Record(offset, timestamp, key, value, headers=(), topic=None, "
                        "partition=-1)\n--\n\n"
                        "One decoded record; immutable. Built by decode_records; a consumer's\n"
                        "records also carry their topic and partition."},
    {0, NULL},
};

#ifndef Py_TPFLAGS_IMMUTABLETYPE
#define Py_TPFLAGS_IMMUTABLETYPE 0
#endif

static PyType_Spec Record_spec = {
    .name = "shmbroker._native.Record",
    .basicsize = sizeof(RecordObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Record_slots,
};

/* ==== FileMap ============================================================================== */

/* A read-only MAP_SHARED mapping of a file that may be longer than the file is now. Python's
 * mmap refuses that, so a log reader had to map again (mmap + munmap) every time the active
 * segment grew past its mapping: on every poll of a caught-up consumer. With room mapped
 * ahead, bytes the partition process appends later show up in the same mapping (the page
 * cache is shared). Touching a page wholly past the file's end raises SIGBUS: the reader
 * only reads below a size it has checked with fstat (log/reader.py). */
typedef struct {
    PyObject_HEAD
    void *addr;        /* NULL once closed */
    size_t length;
    Py_ssize_t exports;
} FileMapObject;

static PyObject *FileMap_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "length", NULL};
    int fd;
    Py_ssize_t length;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "in:FileMap", kwlist, &fd, &length))
        return NULL;
    if (length <= 0)
        return PyErr_Format(PyExc_ValueError, "FileMap: length must be > 0, got %zd", length);
    void *addr;
    Py_BEGIN_ALLOW_THREADS
    addr = mmap(NULL, (size_t)length, PROT_READ, MAP_SHARED, fd, 0);
    Py_END_ALLOW_THREADS
    if (addr == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    FileMapObject *self = (FileMapObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        munmap(addr, (size_t)length);
        return NULL;
    }
    self->addr = addr;
    self->length = (size_t)length;
    return (PyObject *)self;
}

static void FileMap_dealloc(FileMapObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->addr != NULL)
        munmap(self->addr, self->length);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int FileMap_getbuffer(FileMapObject *self, Py_buffer *view, int flags)
{
    if (self->addr == NULL) {
        PyErr_SetString(PyExc_ValueError, "FileMap is closed");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->addr, (Py_ssize_t)self->length, 1,
                          flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void FileMap_releasebuffer(FileMapObject *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
}

static PyObject *FileMap_close(FileMapObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->exports > 0) { /* the same rule as mmap.close(): views keep the pages */
        PyErr_SetString(PyExc_BufferError, "cannot close a FileMap while views of it exist");
        return NULL;
    }
    if (self->addr != NULL) {
        munmap(self->addr, self->length);
        self->addr = NULL;
    }
    Py_RETURN_NONE;
}

static Py_ssize_t FileMap_len(FileMapObject *self)
{
    return self->addr == NULL ? 0 : (Py_ssize_t)self->length;
}

static PyObject *FileMap_get_closed(FileMapObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->addr == NULL);
}

static PyMethodDef FileMap_methods[] = {
    {"close", (PyCFunction)FileMap_close, METH_NOARGS,
     "close(): unmap; BufferError while views exist"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef FileMap_getset[] = {
    {"closed", (getter)FileMap_get_closed, NULL, "whether close() unmapped it", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot FileMap_slots[] = {
    {Py_tp_new, (void *)FileMap_new},
    {Py_tp_dealloc, (void *)FileMap_dealloc},
    {Py_bf_getbuffer, (void *)FileMap_getbuffer},
    {Py_bf_releasebuffer, (void *)FileMap_releasebuffer},
    {Py_sq_length, (void *)FileMap_len},
    {Py_mp_length, (void *)FileMap_len},
    {Py_tp_methods, (void *)FileMap_methods},
    {Py_tp_getset, (void *)FileMap_getset},
    {Py_tp_doc, (void *)"FileMap(fd, length)\n--\n\n"
                        "A read-only shared mapping of length bytes of a file, which may be\n"
                        "longer than the file; read only below a size you have checked."},
    {0, NULL},
};

static PyType_Spec FileMap_spec = {
    .name = "shmbroker._native.FileMap",
    .basicsize = sizeof(FileMapObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = FileMap_slots,
};

/* ==== crc32c / murmur2 ===================================================================== */

typedef uint32_t (*crc_fn)(uint32_t, const void *, size_t);

static PyObject *crc_common(PyObject *args, PyObject *kwds, crc_fn fn, const char *fmt)
{
    static char *kwlist[] = {"data", "crc", NULL};
    Py_buffer data;
    unsigned int crc = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, fmt, kwlist, &data, &crc))
        return NULL;
    uint32_t result;
    if (data.len >= GIL_RELEASE_BYTES_MIN) {
        Py_BEGIN_ALLOW_THREADS
        result = fn((uint32_t)crc, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
    } else {
        result = fn((uint32_t)crc, data.buf, (size_t)data.len);
    }
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(result);
}

static PyObject *py_crc32c(PyObject *module, PyObject *args, PyObject *kwds)
{
    return crc_common(args, kwds, shmb_crc32c, "y*|I:crc32c");
}

static PyObject *py_crc32c_table(PyObject *module, PyObject *args, PyObject *kwds)
{
    return crc_common(args, kwds, shmb_crc32c_table, "y*|I:crc32c_table");
}

static PyObject *py_crc32c_impl(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyUnicode_FromString(shmb_crc32c_impl());
}

static PyObject *py_crc32c_impls(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    PyObject *names = PyList_New(0);
    if (names == NULL)
        return NULL;
    const char *name;
    for (size_t i = 0; (name = shmb_crc32c_impl_name(i)) != NULL; i++) {
        PyObject *item = PyUnicode_FromString(name);
        if (item == NULL || PyList_Append(names, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(names);
            return NULL;
        }
        Py_DECREF(item);
    }
    PyObject *result = PyList_AsTuple(names);
    Py_DECREF(names);
    return result;
}

static PyObject *py_crc32c_with(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "data", "crc", NULL};
    const char *name;
    Py_buffer data;
    unsigned int crc = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sy*|I:crc32c_with", kwlist, &name, &data, &crc))
        return NULL;
    shmb_crc32c_fn fn = shmb_crc32c_impl_fn(name);
    if (fn == NULL) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "no crc32c implementation '%s' on this CPU", name);
    }
    uint32_t result;
    if (data.len >= GIL_RELEASE_BYTES_MIN) {
        Py_BEGIN_ALLOW_THREADS
        result = fn((uint32_t)crc, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
    } else {
        result = fn((uint32_t)crc, data.buf, (size_t)data.len);
    }
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(result);
}

static PyObject *py_murmur2(PyObject *module, PyObject *arg)
{
    Py_buffer key;
    if (PyObject_GetBuffer(arg, &key, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "murmur2: expected a contiguous bytes-like key, got %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    int32_t h = shmb_murmur2(key.buf, (size_t)key.len);
    PyBuffer_Release(&key);
    return PyLong_FromLong(h);
}

static PyObject *py_partition_for_key(PyObject *module, PyObject *args)
{
    Py_buffer key;
    long long n;
    if (!PyArg_ParseTuple(args, "y*L:partition_for_key", &key, &n))
        return NULL;
    if (n <= 0) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "num_partitions must be positive, got %lld", n);
        return NULL;
    }
    /* murmur2 & 0x7fffffff < 2**31, so any n above INT32_MAX leaves it unchanged. */
    int32_t p = n > INT32_MAX ? (int32_t)((uint32_t)shmb_murmur2(key.buf, (size_t)key.len) & 0x7fffffffu)
                              : shmb_partition_for_key(key.buf, (size_t)key.len, (int32_t)n);
    PyBuffer_Release(&key);
    return PyLong_FromLong(p);
}

/* ==== walk_batches ========================================================================= */

/* walk_batches(buf, position, end, offset, expected_base, expected_last) ->
 * (status, position, base, last, expected_base): shmb_rb_walk_to over a segment's mapping
 * (LogReader._walk; -1 for "no expectation"). Long walks (from a segment's start, after a
 * distrusted index) run without the GIL; the buffer export keeps the mapping alive. */
#define WALK_GIL_FREE_BYTES (64 * 1024)

static int tail_ll(PyObject *o, long long *out);

static PyObject *py_walk_batches(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6)
        return PyErr_Format(PyExc_TypeError, "walk_batches takes 6 arguments, got %zd", nargs);
    long long position, end, offset, expected_base, expected_last;
    if (tail_ll(args[1], &position) < 0 || tail_ll(args[2], &end) < 0 ||
        tail_ll(args[3], &offset) < 0 || tail_ll(args[4], &expected_base) < 0 ||
        tail_ll(args[5], &expected_last) < 0)
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[0], &v, PyBUF_SIMPLE) < 0)
        return NULL;
    if (position < 0 || end < position || end > v.len || expected_base < -1 ||
        expected_last < -1) {
        PyBuffer_Release(&v);
        return PyErr_Format(PyExc_ValueError,
                            "walk_batches: position %lld, end %lld outside the buffer (%zd bytes) "
                            "or an expectation below -1", position, end, v.len);
    }
    shmb_rb_walk w;
    int status;
    if (end - position > WALK_GIL_FREE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        status = shmb_rb_walk_to(v.buf, (size_t)end, (size_t)position, offset, expected_base,
                                 expected_last, &w);
        Py_END_ALLOW_THREADS
    } else {
        status = shmb_rb_walk_to(v.buf, (size_t)end, (size_t)position, offset, expected_base,
                                 expected_last, &w);
    }
    PyBuffer_Release(&v);
    return Py_BuildValue("(inLLL)", status, (Py_ssize_t)w.position, (long long)w.base,
                         (long long)w.last, (long long)w.expected_base);
}

/* ==== scan_batches ========================================================================= */

/* base + delta as a Python int, exact even where int64 would overflow. */
static PyObject *int64_plus(int64_t base, int64_t delta)
{
    int64_t sum;
    if (!__builtin_add_overflow(base, delta, &sum))
        return PyLong_FromLongLong(sum);
    PyObject *a = PyLong_FromLongLong(base), *b = PyLong_FromLongLong(delta), *r = NULL;
    if (a && b)
        r = PyNumber_Add(a, b);
    Py_XDECREF(a);
    Py_XDECREF(b);
    return r;
}

static PyObject *batch_info_tuple(const shmb_rb_batch_info *b)
{
    PyObject *t = PyTuple_New(5);
    if (t == NULL)
        return NULL;
    PyObject *items[5] = {
        PyLong_FromSize_t(b->position),
        PyLong_FromLongLong(b->header.base_offset),
        int64_plus(b->header.base_offset, b->header.last_offset_delta),
        PyLong_FromLongLong(b->header.max_timestamp),
        PyLong_FromLong(b->header.records_count),
    };
    int ok = 1;
    for (int i = 0; i < 5; i++) {
        if (items[i] == NULL)
            ok = 0;
        PyTuple_SET_ITEM(t, i, items[i]); /* NULL items are fine for the DECREF below */
    }
    if (!ok) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

static PyObject *py_scan_batches(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buf", "verify_crc", "verify_records", "batch_bytes_max", NULL};
    Py_buffer buf;
    int verify_crc = 1, verify_records = 0;
    long long batch_bytes_max = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|ppL:scan_batches", kwlist, &buf,
                                     &verify_crc, &verify_records, &batch_bytes_max))
        return NULL;
    const shmb_rb_scan_opts opts = {verify_crc, verify_records, batch_bytes_max};
    const uint8_t *data = buf.buf;
    size_t len = (size_t)buf.len, pos = 0;
    shmb_rb_batch_info chunk[SCAN_CHUNK_BATCHES];
    shmb_rb_error err;
    int status;
    PyObject *batches = PyList_New(0);
    if (batches == NULL)
        goto fail;
    for (;;) {
        size_t n = 0, valid = pos;
        if (len - pos >= GIL_RELEASE_BYTES_MIN) {
            Py_BEGIN_ALLOW_THREADS
            status = shmb_rb_scan(data, len, pos, &opts, chunk, SCAN_CHUNK_BATCHES, &n, &valid,
                                  &err);
            Py_END_ALLOW_THREADS
        } else {
            status = shmb_rb_scan(data, len, pos, &opts, chunk, SCAN_CHUNK_BATCHES, &n, &valid,
                                  &err);
        }
        for (size_t i = 0; i < n; i++) {
            PyObject *t = batch_info_tuple(&chunk[i]);
            if (t == NULL || PyList_Append(batches, t) < 0) {
                Py_XDECREF(t);
                goto fail;
            }
            Py_DECREF(t);
        }
        pos = valid;
        if (status != SHMB_RB_SCAN_MORE)
            break;
    }
    PyBuffer_Release(&buf);
    return Py_BuildValue("(ninN)", (Py_ssize_t)pos, status,
                         status == SHMB_RB_SCAN_OK ? (Py_ssize_t)-1 : (Py_ssize_t)pos, batches);
fail:
    Py_XDECREF(batches);
    PyBuffer_Release(&buf);
    return NULL;
}

/* ==== decoding ============================================================================= */

/* Struct-of-arrays for decode_records, one allocation. */
typedef struct {
    shmb_rb_columns cols;
    void *memory;
} owned_columns;

static int owned_columns_alloc(owned_columns *oc, size_t n)
{
    size_t wide = n * sizeof(int64_t), narrow = n * sizeof(int32_t);
    char *m = PyMem_RawMalloc(5 * wide + 3 * narrow + 1);
    if (m == NULL)
        return -1;
    oc->memory = m;
    oc->cols.offsets = (int64_t *)m;
    oc->cols.timestamps = (int64_t *)(m + wide);
    oc->cols.key_starts = (int64_t *)(m + 2 * wide);
    oc->cols.value_starts = (int64_t *)(m + 3 * wide);
    oc->cols.headers_starts = (int64_t *)(m + 4 * wide);
    oc->cols.key_lengths = (int32_t *)(m + 5 * wide);
    oc->cols.value_lengths = (int32_t *)(m + 5 * wide + narrow);
    oc->cols.headers_counts = (int32_t *)(m + 5 * wide + 2 * narrow);
    return 0;
}

static inline PyObject *bytes_at(const uint8_t *data, int64_t start, int32_t length)
{
    if (length < 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)data + start, length);
}

/* Header keys repeat from record to record ("trace-id", ...): one decode call reuses the str of
 * a key it has seen, which saves a UTF-8 decode and an object per header. */
#define KEY_CACHE_SLOTS 8
#define KEY_CACHE_BYTES_MAX 64

typedef struct {
    PyObject *str[KEY_CACHE_SLOTS];
    const uint8_t *bytes[KEY_CACHE_SLOTS];
    int32_t length[KEY_CACHE_SLOTS];
    unsigned next;
} key_cache;

static void key_cache_clear(key_cache *kc)
{
    for (int i = 0; i < KEY_CACHE_SLOTS; i++)
        Py_CLEAR(kc->str[i]);
}

/* A new reference to the str of header key k (kl bytes), or NULL with an exception. */
static PyObject *header_key(key_cache *kc, const uint8_t *k, int32_t kl)
{
    if (kl > KEY_CACHE_BYTES_MAX)
        return PyUnicode_DecodeUTF8((const char *)k, kl, "strict");
    for (int i = 0; i < KEY_CACHE_SLOTS; i++) {
        if (kc->str[i] && kc->length[i] == kl && memcmp(kc->bytes[i], k, (size_t)kl) == 0) {
            Py_INCREF(kc->str[i]);
            return kc->str[i];
        }
    }
    PyObject *str = PyUnicode_DecodeUTF8((const char *)k, kl, "strict");
    if (str == NULL)
        return NULL;
    unsigned slot = kc->next++ % KEY_CACHE_SLOTS;
    Py_XSETREF(kc->str[slot], Py_NewRef(str));
    kc->bytes[slot] = k; /* points into the buffer, which outlives the cache */
    kc->length[slot] = kl;
    return str;
}

static PyObject *build_headers(module_state *st, key_cache *kc, const uint8_t *data, size_t len,
                               int64_t start, int32_t count)
{
    if (count == 0)
        return Py_NewRef(st->empty_tuple);
    PyObject *t = PyTuple_New(count);
    if (t == NULL)
        return NULL;
    const uint8_t *p = data + start, *end = data + len;
    for (int32_t j = 0; j < count; j++) {
        const uint8_t *k, *v;
        int32_t kl, vl;
        PyObject *key;
        if (shmb_rb_header_next(&p, end, &k, &kl, &v, &vl) != 0 ||
            (key = header_key(kc, k, kl)) == NULL) {
            /* The walk checked both, so only a buffer changed under us gets here. */
            shmb_rb_error err = {(size_t)start, (size_t)start, "header changed while decoding"};
            Py_DECREF(t);
            PyErr_Clear();
            return raise_status(st, SHMB_RB_SCAN_BAD_RECORD, &err);
        }
        PyObject *value = vl < 0 ? Py_NewRef(Py_None)
                                 : PyBytes_FromStringAndSize((const char *)v, vl);
        PyObject *pair = value ? PyTuple_New(2) : NULL;
        if (pair == NULL) {
            Py_DECREF(key);
            Py_XDECREF(value);
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, key);
        PyTuple_SET_ITEM(pair, 1, value);
        /* Only str, bytes and None inside: no cycle is possible, so keep the collector off it
         * (CPython's own GC would untrack it on its first pass anyway). */
        PyObject_GC_UnTrack(pair);
        PyTuple_SET_ITEM(t, j, pair);
    }
    PyObject_GC_UnTrack(t);
    return t;
}

static PyObject *build_records(module_state *st, const uint8_t *data, size_t len,
                               const shmb_rb_columns *c, size_t n, PyObject *topic,
                               int64_t partition)
{
    key_cache kc;
    memset(&kc, 0, sizeof kc);
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        RecordObject *r = PyObject_New(RecordObject, st->record_type);
        if (r == NULL)
            goto fail;
        r->offset = c->offsets[i];
        r->timestamp = c->timestamps[i];
        r->topic = topic == Py_None ? NULL : Py_NewRef(topic);
        r->partition = partition;
        r->key = bytes_at(data, c->key_starts[i], c->key_lengths[i]);
        r->value = bytes_at(data, c->value_starts[i], c->value_lengths[i]);
        r->headers = (r->key && r->value) ? build_headers(st, &kc, data, len, c->headers_starts[i],
                                                          c->headers_counts[i])
                                          : NULL;
        PyList_SET_ITEM(list, (Py_ssize_t)i, (PyObject *)r);
        if (r->headers == NULL)
            goto fail;
    }
    key_cache_clear(&kc);
    return list;
fail:
    key_cache_clear(&kc);
    Py_DECREF(list);
    return NULL;
}

static PyObject *py_decode_records(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buf", "verify_crc", "topic", "partition", NULL};
    module_state *st = get_state(module);
    Py_buffer buf;
    int verify_crc = 1;
    PyObject *topic = Py_None;
    long long partition = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|pOL:decode_records", kwlist, &buf,
                                     &verify_crc, &topic, &partition))
        return NULL;
    if (topic != Py_None && !PyUnicode_CheckExact(topic)) {
        PyBuffer_Release(&buf);
        return PyErr_Format(PyExc_TypeError, "decode_records: topic must be str or None");
    }
    const uint8_t *data = buf.buf;
    size_t len = (size_t)buf.len, n = 0, cap;
    int status;
    shmb_rb_error err;
    owned_columns oc = {{0}, NULL};
    PyObject *result = NULL;
    int release = len >= GIL_RELEASE_BYTES_MIN;

    /* The count trusts headers only to size the columns; shmb_rb_decode checks everything and
     * never writes past cap (a buffer that changes under us ends in NO_ROOM, not overflow). */
    cap = shmb_rb_count_records(data, len);
    if (owned_columns_alloc(&oc, cap) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    if (release) {
        Py_BEGIN_ALLOW_THREADS
        status = shmb_rb_decode(data, len, verify_crc, &oc.cols, cap, &n, &err);
        Py_END_ALLOW_THREADS
    } else {
        status = shmb_rb_decode(data, len, verify_crc, &oc.cols, cap, &n, &err);
    }
    if (status == SHMB_RB_DECODE_NO_ROOM) {
        snprintf(err.message, sizeof err.message, "buffer changed while it was decoded");
        status = SHMB_RB_SCAN_BAD_RECORD;
    }
    if (status != SHMB_RB_SCAN_OK)
        raise_status(st, status, &err);
    else
        result = build_records(st, data, len, &oc.cols, n, topic, (int64_t)partition);
done:
    PyMem_RawFree(oc.memory);
    PyBuffer_Release(&buf);
    return result;
}

/* Gets a writable 1-D C-contiguous signed integer buffer of itemsize bytes. */
static int get_int_column(PyObject *o, Py_buffer *view, Py_ssize_t itemsize, const char *name)
{
    if (PyObject_GetBuffer(o, view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_ND) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a writable C-contiguous int%d array, got %.100s",
                     name, (int)(itemsize * 8), Py_TYPE(o)->tp_name);
        return -1;
    }
    const char *f = view->format ? view->format : "B";
    while (*f == '@' || *f == '=' || *f == '<')
        f++;
    int ok = view->ndim == 1 && view->itemsize == itemsize && f[0] != '\0' && f[1] == '\0' &&
             ((itemsize == 8 && (f[0] == 'q' || (f[0] == 'l' && sizeof(long) == 8))) ||
              (itemsize == 4 && (f[0] == 'i' || (f[0] == 'l' && sizeof(long) == 4))));
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: expected a 1-D int%d array, got format '%s' ndim %d",
                     name, (int)(itemsize * 8), view->format ? view->format : "B", view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

#define N_COLUMNS 6

static PyObject *py_decode_columnar_into(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buf", "offsets", "timestamps", "key_starts", "key_lengths",
                             "value_starts", "value_lengths", "verify_crc", NULL};
    static const Py_ssize_t itemsizes[N_COLUMNS] = {8, 8, 8, 4, 8, 4};
    module_state *st = get_state(module);
    Py_buffer buf;
    PyObject *objs[N_COLUMNS];
    Py_buffer views[N_COLUMNS];
    int nviews = 0, verify_crc = 1;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*OOOOOO|p:decode_columnar_into", kwlist, &buf,
                                     &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &objs[5],
                                     &verify_crc))
        return NULL;
    size_t cap = SIZE_MAX;
    for (; nviews < N_COLUMNS; nviews++) {
        if (get_int_column(objs[nviews], &views[nviews], itemsizes[nviews], kwlist[nviews + 1]) < 0)
            goto done;
        size_t n = (size_t)(views[nviews].len / itemsizes[nviews]);
        if (n < cap)
            cap = n;
    }
    const shmb_rb_columns cols = {
        .offsets = views[0].buf,
        .timestamps = views[1].buf,
        .key_starts = views[2].buf,
        .key_lengths = views[3].buf,
        .value_starts = views[4].buf,
        .value_lengths = views[5].buf,
    };
    const uint8_t *data = buf.buf;
    size_t len = (size_t)buf.len, n = 0;
    shmb_rb_error err;
    int status;
    if (len >= GIL_RELEASE_BYTES_MIN) {
        Py_BEGIN_ALLOW_THREADS
        status = shmb_rb_decode(data, len, verify_crc, &cols, cap, &n, &err);
        Py_END_ALLOW_THREADS
    } else {
        status = shmb_rb_decode(data, len, verify_crc, &cols, cap, &n, &err);
    }
    if (status == SHMB_RB_DECODE_NO_ROOM)
        PyErr_SetString(PyExc_ValueError, err.message);
    else if (status != SHMB_RB_SCAN_OK)
        raise_status(st, status, &err);
    else
        result = PyLong_FromSize_t(n);
done:
    for (int i = 0; i < nviews; i++)
        PyBuffer_Release(&views[i]);
    PyBuffer_Release(&buf);
    return result;
}

/* ==== encode_batch ========================================================================= */

/* Everything encode_batch holds while it writes without the GIL; released by enc_free. */
typedef struct {
    PyObject **refs;
    Py_ssize_t nrefs, caprefs;
    Py_buffer *views;
    Py_ssize_t nviews, capviews;
    shmb_slice *values, *keys;
    shmb_header_slice *headers;
    size_t *header_starts;
    int64_t *timestamps;
    Py_buffer values_2d, timestamps_buf;
    int have_values_2d, have_timestamps_buf;
} enc_hold;

static void enc_free(enc_hold *h)
{
    for (Py_ssize_t i = 0; i < h->nviews; i++)
        PyBuffer_Release(&h->views[i]);
    for (Py_ssize_t i = 0; i < h->nrefs; i++)
        Py_DECREF(h->refs[i]);
    if (h->have_values_2d)
        PyBuffer_Release(&h->values_2d);
    if (h->have_timestamps_buf)
        PyBuffer_Release(&h->timestamps_buf);
    PyMem_Free(h->views);
    PyMem_Free(h->refs);
    PyMem_Free(h->values);
    PyMem_Free(h->keys);
    PyMem_Free(h->headers);
    PyMem_Free(h->header_starts);
    PyMem_Free(h->timestamps);
}

/* Keeps a (new) reference until enc_free; steals o. */
static int enc_keep(enc_hold *h, PyObject *o)
{
    if (h->nrefs == h->caprefs) {
        Py_ssize_t cap = h->caprefs ? 2 * h->caprefs : 16;
        PyObject **r = PyMem_Realloc(h->refs, (size_t)cap * sizeof *r);
        if (r == NULL) {
            Py_DECREF(o);
            PyErr_NoMemory();
            return -1;
        }
        h->refs = r;
        h->caprefs = cap;
    }
    h->refs[h->nrefs++] = o;
    return 0;
}

/* A tuple with the items of seq, kept alive until enc_free (so no other thread can drop the
 * items while we write without the GIL). Returns a borrowed reference. */
static PyObject *enc_tuple(enc_hold *h, PyObject *seq, const char *name, Py_ssize_t i)
{
    PyObject *t = PySequence_Tuple(seq);
    if (t == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            if (i < 0)
                PyErr_Format(PyExc_TypeError, "%s: expected a sequence, got %.100s", name,
                             Py_TYPE(seq)->tp_name);
            else
                PyErr_Format(PyExc_TypeError, "%s[%zd]: expected a sequence, got %.100s", name, i,
                             Py_TYPE(seq)->tp_name);
        }
        return NULL;
    }
    return enc_keep(h, t) < 0 ? NULL : t;
}

/* A bytes-like object or None as a slice; i >= 0 names the item, j >= 0 a header. */
static int enc_slice(enc_hold *h, PyObject *o, shmb_slice *s, int nullable, const char *name,
                     Py_ssize_t i, Py_ssize_t j)
{
    if (o == Py_None && nullable) {
        s->data = NULL;
        s->length = -1;
        return 0;
    }
    if (PyBytes_CheckExact(o)) { /* immutable, alive through the tuple that holds it */
        s->data = (const uint8_t *)PyBytes_AS_STRING(o);
        s->length = PyBytes_GET_SIZE(o);
    } else {
        if (h->nviews == h->capviews) {
            Py_ssize_t cap = h->capviews ? 2 * h->capviews : 8;
            Py_buffer *v = PyMem_Realloc(h->views, (size_t)cap * sizeof *v);
            if (v == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            h->views = v;
            h->capviews = cap;
        }
        if (PyObject_GetBuffer(o, &h->views[h->nviews], PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            if (j < 0)
                PyErr_Format(PyExc_TypeError, "%s[%zd]: expected a bytes-like object%s, got %.100s",
                             name, i, nullable ? " or None" : "", Py_TYPE(o)->tp_name);
            else
                PyErr_Format(PyExc_TypeError,
                             "%s[%zd][%zd]: expected a bytes-like value or None, got %.100s",
                             name, i, j, Py_TYPE(o)->tp_name);
            return -1;
        }
        s->data = h->views[h->nviews].buf;
        s->length = h->views[h->nviews].len;
        h->nviews++;
    }
    if (s->length > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s[%zd]: %zd bytes is more than a record can hold", name,
                     i, (Py_ssize_t)s->length);
        return -1;
    }
    return 0;
}

static shmb_slice *enc_slices(enc_hold *h, PyObject *seq, const char *name, Py_ssize_t count)
{
    shmb_slice *out = PyMem_Malloc((size_t)(count ? count : 1) * sizeof *out);
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (enc_slice(h, PyTuple_GET_ITEM(seq, i), &out[i], 1, name, i, -1) < 0) {
            PyMem_Free(out);
            return NULL;
        }
    }
    return out;
}

static int check_length(Py_ssize_t got, Py_ssize_t want, const char *name)
{
    if (got != want) {
        PyErr_Format(PyExc_ValueError, "%s: has %zd items, values has %zd", name, got, want);
        return -1;
    }
    return 0;
}

/* values: a sequence of bytes-like-or-None, or one 2-D C-contiguous uint8 buffer (any other
 * buffer, bytes included, is a ValueError, as in the reference). */
static Py_ssize_t enc_values(enc_hold *h, PyObject *values)
{
    if (PyObject_CheckBuffer(values)) {
        Py_buffer *v = &h->values_2d;
        if (PyObject_GetBuffer(values, v, PyBUF_RECORDS_RO) < 0)
            return -1;
        h->have_values_2d = 1;
        const char *f = v->format ? v->format : "B";
        while (*f == '@' || *f == '=' || *f == '<' || *f == '>' || *f == '!')
            f++;
        if (v->ndim != 2) {
            PyErr_Format(PyExc_ValueError,
                         "values: a buffer of values must be 2-D (one row per value), got %d-D",
                         v->ndim);
            return -1;
        }
        if (v->itemsize != 1 || !(strcmp(f, "B") == 0 || strcmp(f, "b") == 0 ||
                                  strcmp(f, "c") == 0) || !PyBuffer_IsContiguous(v, 'C')) {
            PyErr_Format(PyExc_ValueError,
                         "values: a 2-D values buffer must be C-contiguous uint8, got format '%s'",
                         v->format ? v->format : "B");
            return -1;
        }
        Py_ssize_t rows = v->shape[0], width = v->shape[1];
        if (width > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "values: rows longer than 2**31-1 bytes");
            return -1;
        }
        h->values = PyMem_Malloc((size_t)(rows ? rows : 1) * sizeof *h->values);
        if (h->values == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < rows; i++) {
            h->values[i].data = (const uint8_t *)v->buf + i * width;
            h->values[i].length = width;
        }
        return rows;
    }
    PyObject *t = enc_tuple(h, values, "values", -1);
    if (t == NULL)
        return -1;
    h->values = enc_slices(h, t, "values", PyTuple_GET_SIZE(t));
    return h->values ? PyTuple_GET_SIZE(t) : -1;
}

static int enc_headers(enc_hold *h, PyObject *headers, Py_ssize_t count)
{
    PyObject *outer = enc_tuple(h, headers, "headers", -1);
    if (outer == NULL || check_length(PyTuple_GET_SIZE(outer), count, "headers") < 0)
        return -1;
    h->header_starts = PyMem_Malloc((size_t)(count + 1) * sizeof *h->header_starts);
    PyObject **items = PyMem_Malloc((size_t)(count ? count : 1) * sizeof *items);
    if (h->header_starts == NULL || items == NULL) {
        PyMem_Free(items);
        PyErr_NoMemory();
        return -1;
    }
    size_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) { /* first pass: tuples and the total count */
        PyObject *item = PyTuple_GET_ITEM(outer, i);
        items[i] = item == Py_None ? NULL : enc_tuple(h, item, "headers", i);
        if (item != Py_None && items[i] == NULL) {
            PyMem_Free(items);
            return -1;
        }
        h->header_starts[i] = total;
        total += items[i] ? (size_t)PyTuple_GET_SIZE(items[i]) : 0;
    }
    h->header_starts[count] = total;
    h->headers = PyMem_Malloc((total ? total : 1) * sizeof *h->headers);
    if (h->headers == NULL) {
        PyMem_Free(items);
        PyErr_NoMemory();
        return -1;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < count && rc == 0; i++) {
        Py_ssize_t n = items[i] ? PyTuple_GET_SIZE(items[i]) : 0;
        for (Py_ssize_t j = 0; j < n && rc == 0; j++) {
            shmb_header_slice *hs = &h->headers[h->header_starts[i] + (size_t)j];
            PyObject *pair = PyTuple_GET_ITEM(items[i], j);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
                PyObject *t = PySequence_Check(pair) && !PyUnicode_Check(pair)
                                  ? PySequence_Tuple(pair) : NULL;
                if (t == NULL || PyTuple_GET_SIZE(t) != 2) {
                    Py_XDECREF(t);
                    PyErr_Clear();
                    PyErr_Format(PyExc_TypeError,
                                 "headers[%zd][%zd]: expected a (str, bytes-or-None) pair, got "
                                 "%.100s", i, j, Py_TYPE(pair)->tp_name);
                    rc = -1;
                    break;
                }
                if (enc_keep(h, t) < 0) {
                    rc = -1;
                    break;
                }
                pair = t;
            }
            PyObject *key = PyTuple_GET_ITEM(pair, 0);
            if (!PyUnicode_Check(key)) {
                PyErr_Format(PyExc_TypeError, "headers[%zd][%zd]: key must be str, got %.100s", i,
                             j, Py_TYPE(key)->tp_name);
                rc = -1;
                break;
            }
            Py_ssize_t klen;
            const char *k = PyUnicode_AsUTF8AndSize(key, &klen); /* cached in the str */
            if (k == NULL) {
                rc = -1;
                break;
            }
            hs->key.data = (const uint8_t *)k;
            hs->key.length = klen;
            rc = enc_slice(h, PyTuple_GET_ITEM(pair, 1), &hs->value, 1, "headers", i, j);
        }
    }
    PyMem_Free(items);
    return rc;
}

static int is_int64_format(const char *f)
{
    if (f == NULL)
        return 0;
    while (*f == '@' || *f == '=' || *f == '<')
        f++;
    return (f[0] == 'q' || (f[0] == 'l' && sizeof(long) == 8)) && f[1] == '\0';
}

static int enc_timestamps(enc_hold *h, PyObject *timestamps, Py_ssize_t count)
{
    if (PyObject_CheckBuffer(timestamps)) {
        Py_buffer *v = &h->timestamps_buf;
        if (PyObject_GetBuffer(timestamps, v, PyBUF_FORMAT | PyBUF_ND) < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "timestamps: a buffer must be 1-D C-contiguous int64 (%.100s is not)",
                         Py_TYPE(timestamps)->tp_name);
            return -1;
        }
        h->have_timestamps_buf = 1;
        if (v->ndim != 1 || v->itemsize != 8 || !is_int64_format(v->format)) {
            PyErr_Format(PyExc_TypeError,
                         "timestamps: a buffer must be 1-D C-contiguous int64, got format '%s' "
                         "ndim %d", v->format ? v->format : "B", v->ndim);
            return -1;
        }
        if (check_length(v->shape[0], count, "timestamps") < 0)
            return -1;
        h->timestamps = PyMem_Malloc((size_t)count * sizeof(int64_t));
        if (h->timestamps == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(h->timestamps, v->buf, (size_t)count * sizeof(int64_t));
        return 0;
    }
    PyObject *seq = PySequence_Fast(timestamps, "timestamps: expected a sequence of ints");
    if (seq == NULL)
        return -1;
    if (check_length(PySequence_Fast_GET_SIZE(seq), count, "timestamps") < 0) {
        Py_DECREF(seq);
        return -1;
    }
    h->timestamps = PyMem_Malloc((size_t)count * sizeof(int64_t));
    if (h->timestamps == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < count; i++) {
        int overflow = 0;
        long long t = PyLong_Check(items[i]) ? PyLong_AsLongLongAndOverflow(items[i], &overflow)
                                             : -1;
        if (!PyLong_Check(items[i]) && !PyIndex_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "timestamps[%zd]: expected an int, got %.100s", i,
                         Py_TYPE(items[i])->tp_name);
            Py_DECREF(seq);
            return -1;
        }
        if (!PyLong_Check(items[i])) { /* numpy integers and other __index__ types */
            PyObject *as_int = PyNumber_Index(items[i]);
            t = as_int ? PyLong_AsLongLongAndOverflow(as_int, &overflow) : -1;
            Py_XDECREF(as_int);
        }
        if (overflow || (t == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "timestamps[%zd]: outside int64", i);
            Py_DECREF(seq);
            return -1;
        }
        h->timestamps[i] = t;
    }
    Py_DECREF(seq);
    return 0;
}

/* An int argument within [lo, hi], or a ValueError/TypeError naming it. */
static int int_arg(PyObject *o, const char *name, long long lo, long long hi, long long *out)
{
    if (!PyIndex_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int, got %.100s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    PyObject *i = PyNumber_Index(o);
    if (i == NULL)
        return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(i, &overflow);
    Py_DECREF(i);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s: %R is outside [%lld, %lld]", name, o, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *py_encode_batch(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"values", "keys", "headers", "timestamps", "timestamp",
                             "base_offset", "partition_leader_epoch", "producer_id",
                             "producer_epoch", "base_sequence", "attributes", NULL};
    PyObject *values, *keys = Py_None, *headers = Py_None, *timestamps = Py_None;
    PyObject *ints[7] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    static const long long ranges[7][2] = {
        {INT64_MIN, INT64_MAX}, {INT64_MIN, INT64_MAX}, {INT32_MIN, INT32_MAX},
        {INT64_MIN, INT64_MAX}, {INT16_MIN, INT16_MAX}, {INT32_MIN, INT32_MAX},
        {INT16_MIN, INT16_MAX},
    };
    static const long long defaults[7] = {0, 0, -1, -1, -1, -1, 0};
    long long iv[7];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OOOOOOOOOO:encode_batch", kwlist, &values,
                                     &keys, &headers, &timestamps, &ints[0], &ints[1], &ints[2],
                                     &ints[3], &ints[4], &ints[5], &ints[6]))
        return NULL;
    for (int i = 0; i < 7; i++) {
        iv[i] = defaults[i];
        if (ints[i] != NULL && int_arg(ints[i], kwlist[4 + i], ranges[i][0], ranges[i][1], &iv[i]) < 0)
            return NULL;
    }
    if (iv[6] & SHMB_RB_COMPRESSION_MASK) {
        PyErr_Format(PyExc_ValueError,
                     "attributes: compression bits must be 0 (only uncompressed batches are "
                     "encoded), got 0x%llx", (unsigned long long)(uint16_t)iv[6]);
        return NULL;
    }

    enc_hold h;
    memset(&h, 0, sizeof h);
    PyObject *out = NULL;
    Py_ssize_t count = enc_values(&h, values);
    if (count < 0)
        goto done;
    if (count == 0) {
        PyErr_SetString(PyExc_ValueError, "values: a batch needs at least one record");
        goto done;
    }
    if (keys != Py_None) {
        PyObject *t = enc_tuple(&h, keys, "keys", -1);
        if (t == NULL || check_length(PyTuple_GET_SIZE(t), count, "keys") < 0)
            goto done;
        if ((h.keys = enc_slices(&h, t, "keys", count)) == NULL)
            goto done;
    }
    if (headers != Py_None && enc_headers(&h, headers, count) < 0)
        goto done;
    if (timestamps != Py_None && enc_timestamps(&h, timestamps, count) < 0)
        goto done;

    const shmb_rb_encode_input in = {
        .count = (size_t)count,
        .values = h.values,
        .keys = h.keys,
        .header_starts = h.header_starts,
        .headers = h.headers,
        .timestamps = h.timestamps,
        .timestamp = iv[0],
        .base_offset = iv[1],
        .partition_leader_epoch = (int32_t)iv[2],
        .producer_id = iv[3],
        .producer_epoch = (int16_t)iv[4],
        .base_sequence = (int32_t)iv[5],
        .attributes = (int16_t)iv[6],
    };
    size_t size;
    shmb_rb_error err;
    if (shmb_rb_encoded_size(&in, &size, &err) < 0) {
        PyErr_SetString(PyExc_ValueError, err.message);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (out == NULL)
        goto done;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
    if (size >= GIL_RELEASE_BYTES_MIN) {
        Py_BEGIN_ALLOW_THREADS
        shmb_rb_encode(&in, dst, size);
        Py_END_ALLOW_THREADS
    } else {
        shmb_rb_encode(&in, dst, size);
    }
done:
    enc_free(&h);
    return out;
}

/* ==== shared memory: atomics, futex, ingress ring ========================================== */

/* A view of obj with [offset, offset + size) inside it and offset aligned to size. The caller
 * releases view. writable: the buffer must be writable (mmap, bytearray). */
static uint8_t *word_at(PyObject *obj, long long offset, Py_ssize_t size, int writable,
                        Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return NULL;
    if (offset < 0 || offset % size != 0 || offset + size > view->len) {
        PyErr_Format(PyExc_ValueError,
                     "offset %lld: need a %zd-byte aligned word inside a buffer of %zd bytes",
                     offset, size, view->len);
        PyBuffer_Release(view);
        return NULL;
    }
    if (((uintptr_t)view->buf + (uintptr_t)offset) % (uintptr_t)size != 0) {
        PyErr_SetString(PyExc_ValueError, "the buffer itself is not aligned for atomics");
        PyBuffer_Release(view);
        return NULL;
    }
    return (uint8_t *)view->buf + offset;
}

static PyObject *py_atomic_load_u32(PyObject *m, PyObject *args)
{
    PyObject *obj;
    long long off;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OL:atomic_load_u32", &obj, &off))
        return NULL;
    uint8_t *p = word_at(obj, off, 4, 0, &v);
    if (p == NULL)
        return NULL;
    uint32_t x = shmb_u32_load_seq_cst(p);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(x);
}

static PyObject *py_atomic_load_u64(PyObject *m, PyObject *args)
{
    PyObject *obj;
    long long off;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OL:atomic_load_u64", &obj, &off))
        return NULL;
    uint8_t *p = word_at(obj, off, 8, 0, &v);
    if (p == NULL)
        return NULL;
    uint64_t x = shmb_u64_load_seq_cst(p);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(x);
}

static PyObject *py_atomic_store_u32(PyObject *m, PyObject *args)
{
    PyObject *obj;
    long long off;
    unsigned long long x;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OLK:atomic_store_u32", &obj, &off, &x))
        return NULL;
    uint8_t *p = word_at(obj, off, 4, 1, &v);
    if (p == NULL)
        return NULL;
    shmb_u32_store_seq_cst(p, (uint32_t)x);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_atomic_store_u64(PyObject *m, PyObject *args)
{
    PyObject *obj;
    long long off;
    unsigned long long x;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OLK:atomic_store_u64", &obj, &off, &x))
        return NULL;
    uint8_t *p = word_at(obj, off, 8, 1, &v);
    if (p == NULL)
        return NULL;
    shmb_u64_store_seq_cst(p, (uint64_t)x);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_atomic_cas_u32(PyObject *m, PyObject *args)
{
    PyObject *obj;
    long long off;
    unsigned long long expected, desired;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OLKK:atomic_cas_u32", &obj, &off, &expected, &desired))
        return NULL;
    uint8_t *p = word_at(obj, off, 4, 1, &v);
    if (p == NULL)
        return NULL;
    uint32_t e = (uint32_t)expected;
    int ok = shmb_u32_cas(p, &e, (uint32_t)desired);
    PyBuffer_Release(&v);
    return PyBool_FromLong(ok);
}

static PyObject *py_atomic_cas_u64(PyObject *m, PyObject *args)
{
    PyObject *obj;
    long long off;
    unsigned long long expected, desired;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OLKK:atomic_cas_u64", &obj, &off, &expected, &desired))
        return NULL;
    uint8_t *p = word_at(obj, off, 8, 1, &v);
    if (p == NULL)
        return NULL;
    uint64_t e = (uint64_t)expected;
    int ok = shmb_u64_cas(p, &e, (uint64_t)desired);
    PyBuffer_Release(&v);
    return PyBool_FromLong(ok);
}

static PyObject *py_atomic_add_u32(PyObject *m, PyObject *args)
{
    PyObject *obj;
    long long off, delta;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OLL:atomic_add_u32", &obj, &off, &delta))
        return NULL;
    uint8_t *p = word_at(obj, off, 4, 1, &v);
    if (p == NULL)
        return NULL;
    uint32_t old = shmb_u32_fetch_add(p, (uint32_t)delta);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLong(old);
}

static PyObject *py_atomic_add_u64(PyObject *m, PyObject *args)
{
    PyObject *obj;
    long long off, delta;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OLL:atomic_add_u64", &obj, &off, &delta))
        return NULL;
    uint8_t *p = word_at(obj, off, 8, 1, &v);
    if (p == NULL)
        return NULL;
    uint64_t old = shmb_u64_fetch_add(p, (uint64_t)delta);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(old);
}

/* Counters (shmbroker/shm/counters.py): one writer stores a run of consecutive u64 counters
 * once per drain round or request batch, readers load them. Relaxed: a counter is read for
 * display only, nothing else is published through it, so no ordering is needed; each word is
 * still one atomic (untorn) store. One call for the run keeps the hot path at one C call. */
static PyObject *py_atomic_store_u64_many(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "atomic_store_u64_many(buf, offset, values)");
        return NULL;
    }
    long long off = PyLong_AsLongLong(args[1]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    PyObject *seq = PySequence_Fast(args[2], "atomic_store_u64_many: values must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_buffer v;
    uint8_t *p = word_at(args[0], off, 8, 1, &v);
    if (p == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    if (n > (v.len - off) / 8) {
        PyErr_Format(PyExc_ValueError, "atomic_store_u64_many: %zd words at offset %lld pass "
                     "the end of a buffer of %zd bytes", n, off, v.len);
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* PyLong_AsUnsignedLong: the same checks, 64 bits here, and no byte-array path for
         * values past 2**30 (bytes and offsets soon are): the drain round stores 18 a round. */
        _Static_assert(sizeof(unsigned long) == sizeof(uint64_t), "unsigned long is 64 bits");
        unsigned long x = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, i));
        if (x == (unsigned long)-1 && PyErr_Occurred())
            goto fail; /* the words before i are stored: a counter is never half written */
        shmb_u64_store_relaxed(p + 8 * i, (uint64_t)x);
    }
    PyBuffer_Release(&v);
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&v);
    Py_DECREF(seq);
    return NULL;
}

/* frame_offsets(buffer) -> offsets one ring frame's payload takes (shmb_frame_offsets;
 * reference: shm/ring_reference.frame_offsets). */
static PyObject *py_frame_offsets(PyObject *m, PyObject *arg)
{
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    uint64_t n = shmb_frame_offsets(v.buf, (size_t)v.len);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *py_frame_ok(PyObject *m, PyObject *args)
{
    Py_buffer v;
    long long bytes_max, records_max;
    if (!PyArg_ParseTuple(args, "y*LL:frame_ok", &v, &bytes_max, &records_max))
        return NULL;
    int ok = shmb_frame_ok(v.buf, (size_t)v.len, bytes_max, records_max);
    PyBuffer_Release(&v);
    return PyBool_FromLong(ok);
}

static PyObject *py_atomic_load_u64_many(PyObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "atomic_load_u64_many(buf, offset, count)");
        return NULL;
    }
    long long off = PyLong_AsLongLong(args[1]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer v;
    uint8_t *p = word_at(args[0], off, 8, 0, &v);
    if (p == NULL)
        return NULL;
    if (n < 0 || n > (v.len - off) / 8) {
        PyErr_Format(PyExc_ValueError, "atomic_load_u64_many: %zd words at offset %lld do not "
                     "fit a buffer of %zd bytes", n, off, v.len);
        PyBuffer_Release(&v);
        return NULL;
    }
    PyObject *out = PyTuple_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *x = PyLong_FromUnsignedLongLong(shmb_u64_load_relaxed(p + 8 * i));
        if (x == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, x);
    }
    PyBuffer_Release(&v);
    return out;
}

static PyObject *py_futex_wait(PyObject *m, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buf", "offset", "expected", "timeout_ms", "spin_ns", NULL};
    PyObject *obj;
    long long off, timeout_ms = -1, spin_ns = 0;
    unsigned long long expected;
    Py_buffer v;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OLK|LL:futex_wait", kwlist, &obj, &off,
                                     &expected, &timeout_ms, &spin_ns))
        return NULL;
    uint8_t *p = word_at(obj, off, 4, 1, &v);
    if (p == NULL)
        return NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = shmb_futex_wait((const uint32_t *)p, (uint32_t)expected, timeout_ms, spin_ns);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&v);
    if (r == SHMB_WAIT_INTERRUPTED && PyErr_CheckSignals() < 0)
        return NULL;
    return PyLong_FromLong(r);
}

/* futex_waitv([(buf, offset, expected), ...], timeout_ms=-1, spin_ns=0) -> (status, index), or
 * None when the kernel has no futex_waitv (the caller falls back to one word at a time).
 * A waiter only reads its words, so a read-only mapping will do (a group member sleeps on its
 * group's wake word in the coordinator's region, which it maps read-only). */
static PyObject *py_futex_waitv(PyObject *m, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"words", "timeout_ms", "spin_ns", NULL};
    PyObject *list;
    long long timeout_ms = -1, spin_ns = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|LL:futex_waitv", kwlist, &list, &timeout_ms,
                                     &spin_ns))
        return NULL;
    PyObject *seq = PySequence_Fast(list, "futex_waitv: words must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > SHMB_FUTEX_WAITV_MAX) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "futex_waitv: 1..%d words, got %zd",
                            SHMB_FUTEX_WAITV_MAX, n);
    }
    Py_buffer views[SHMB_FUTEX_WAITV_MAX];
    const uint32_t *words[SHMB_FUTEX_WAITV_MAX];
    uint32_t expected[SHMB_FUTEX_WAITV_MAX];
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    for (; got < n; got++) {
        PyObject *obj;
        long long off;
        unsigned long long want;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, got), "OLK:futex_waitv word", &obj,
                              &off, &want))
            goto done;
        uint8_t *p = word_at(obj, off, 4, 0, &views[got]);
        if (p == NULL)
            goto done;
        words[got] = (const uint32_t *)p;
        expected[got] = (uint32_t)want;
    }
    size_t which = 0;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = shmb_futex_waitv(words, expected, (size_t)n, timeout_ms, spin_ns, &which);
    Py_END_ALLOW_THREADS
    if (r == SHMB_WAIT_INTERRUPTED && PyErr_CheckSignals() < 0)
        goto done;
    result = r == SHMB_FUTEX_WAITV_UNSUPPORTED ? Py_NewRef(Py_None)
                                               : Py_BuildValue("(in)", r, (Py_ssize_t)which);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    Py_DECREF(seq);
    return result;
}

static PyObject *py_futex_wake(PyObject *m, PyObject *args)
{
    PyObject *obj;
    long long off;
    int count = INT_MAX;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OL|i:futex_wake", &obj, &off, &count))
        return NULL;
    uint8_t *p = word_at(obj, off, 4, 1, &v);
    if (p == NULL)
        return NULL;
    int n = shmb_futex_wake((uint32_t *)p, count);
    PyBuffer_Release(&v);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(n);
}

static PyObject *raise_ring_corrupt(module_state *st, const shmb_ring_error *err)
{
    PyObject *exc = PyObject_CallFunction(st->ring_corrupt_error, "sK", err->message,
                                          (unsigned long long)err->position);
    if (exc != NULL) {
        PyErr_SetObject(st->ring_corrupt_error, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* A mapped region: writable or read-only, at least as large as a ring header. */
static int region_view(PyObject *obj, int writable, Py_buffer *v, const char *what)
{
    if (PyObject_GetBuffer(obj, v, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if ((uintptr_t)v->buf % 64 != 0) {
        PyErr_Format(PyExc_ValueError, "%s: the region must be 64-byte aligned (a mapping)", what);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* ==== tail_read: a caught-up consumer's read of one partition in one call ================== */

/* The common case of Consumer.poll for one partition, in one call: the published state
 * (seqlock), the batches after the reader's hint in the active segment, their records. It
 * declines (TAIL_DECLINED, nothing changed) whenever anything is not that case (another
 * segment, the mapping too short, a hint that does not match, a corrupt or torn byte, the
 * state mid-publish), and Consumer then takes the Python read (log/reader.py), which is the
 * reference this is tested against and which raises the precise errors. */
#define TAIL_RECORDS 0
#define TAIL_NOTHING 1
#define TAIL_DECLINED 2
#define TAIL_SEQLOCK_TRIES 64

static PyObject *tail_declined(void)
{
    return Py_BuildValue("(iOOOOOOO)", TAIL_DECLINED, Py_None, Py_None, Py_None, Py_None,
                         Py_None, Py_None, Py_None);
}

static int tail_ll(PyObject *o, long long *out)
{
    *out = PyLong_AsLongLong(o);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* Sleeps until the partition publishes (hw_seq differs from seen), as
 * ControlRegion.wait_hw_change does, the GIL released: the spin first (not counted: the
 * publisher need not wake a spinner), then counted in hw_waiters (seq_cst, so the publisher,
 * which bumps hw_seq and then reads hw_waiters, either sees the count or the futex's compare
 * sees the new hw_seq) for the sleep. */
static int tail_wait(uint8_t *ctl, uint32_t seen, long long wait_ms, long long spin_ns)
{
    int r;
    const uint32_t *word = (const uint32_t *)(ctl + SHMB_CTL_HW_SEQ_OFFSET);
    Py_BEGIN_ALLOW_THREADS
    int64_t start = shmb_monotonic_ns();
    if (spin_ns > 0 && shmb_spin_until_changed(word, seen, spin_ns)) {
        r = SHMB_WAIT_CHANGED;
    } else {
        int64_t left_ms = wait_ms - (shmb_monotonic_ns() - start) / 1000000;
        shmb_ctl_hw_waiter_enter(ctl);
        r = shmb_futex_wait(word, seen, left_ms > 0 ? left_ms : 0, 0);
        shmb_ctl_hw_waiter_leave(ctl);
    }
    Py_END_ALLOW_THREADS
    return r;
}

static PyObject *py_tail_read(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    /* control, segment_map, segment_base, offset, position, checked_end, fd, max_bytes,
     * verify_crc, topic, partition[, wait_ms, spin_ns[, hint_offset]]: hint_offset is the base
     * offset of the batch at `position` (default: offset); below offset, the batch holding
     * offset is found by walking headers from there (shmb_rb_walk_to: a consumer that took
     * the records in between from a ring), and records before offset are left out. */
    if (nargs != 11 && nargs != 13 && nargs != 14)
        return PyErr_Format(PyExc_TypeError, "tail_read takes 11, 13 or 14 arguments, got %zd",
                            nargs);
    module_state *st = get_state(module);
    long long segment_base, offset, position, checked_end, fd, max_bytes, partition;
    long long wait_ms = 0, spin_ns = 0, hint_offset;
    if (tail_ll(args[2], &segment_base) < 0 || tail_ll(args[3], &offset) < 0 ||
        tail_ll(args[4], &position) < 0 || tail_ll(args[5], &checked_end) < 0 ||
        tail_ll(args[6], &fd) < 0 || tail_ll(args[7], &max_bytes) < 0 ||
        tail_ll(args[10], &partition) < 0)
        return NULL;
    if (nargs >= 13 && (tail_ll(args[11], &wait_ms) < 0 || tail_ll(args[12], &spin_ns) < 0))
        return NULL;
    hint_offset = offset;
    if (nargs == 14 && tail_ll(args[13], &hint_offset) < 0)
        return NULL;
    if (wait_ms < 0 || spin_ns < 0)
        return PyErr_Format(PyExc_ValueError, "tail_read: wait_ms and spin_ns must be >= 0");
    if (hint_offset < 0 || hint_offset > offset)
        return PyErr_Format(PyExc_ValueError, "tail_read: hint_offset %lld outside [0, %lld]",
                            hint_offset, offset);
    int verify_crc = PyObject_IsTrue(args[8]);
    if (verify_crc < 0)
        return NULL;
    PyObject *topic = args[9];
    if (topic != Py_None && !PyUnicode_CheckExact(topic))
        return PyErr_Format(PyExc_TypeError, "tail_read: topic must be str or None");
    Py_buffer cv, mv;
    if (region_view(args[0], 1, &cv, "control region") < 0)
        return NULL;
    if (cv.len < SHMB_CTL_HW_WAITERS_OFFSET + 4) {
        PyBuffer_Release(&cv);
        return PyErr_Format(PyExc_ValueError, "tail_read: control region too short");
    }
    uint8_t *ctl = cv.buf;
    PyObject *result = NULL;
    owned_columns oc = {{0}, NULL};
    int waited = 0;
    mv.obj = NULL;
again:
    if (PyObject_GetBuffer(args[1], &mv, PyBUF_SIMPLE) < 0) {
        PyErr_Clear(); /* a retired (closed) mapping: the Python read maps again */
        PyBuffer_Release(&cv);
        return tail_declined();
    }
    const uint8_t *map = mv.buf;
    size_t map_len = (size_t)mv.len;

    /* hw_seq before the state, as Consumer._read: a publish after this load wakes the sleep. */
    uint32_t hw_seq = shmb_u32_load_acquire(ctl + SHMB_CTL_HW_SEQ_OFFSET);
    int64_t hw = 0, start = 0, active = 0, end = 0;
    int consistent = 0;
    for (int i = 0; i < TAIL_SEQLOCK_TRIES && !consistent; i++) {
        uint64_t s1 = shmb_u64_load_seq_cst(ctl + SHMB_CTL_STATE_SEQ_OFFSET);
        if (s1 & 1)
            continue;
        memcpy(&hw, ctl + SHMB_CTL_HIGH_WATERMARK_OFFSET, 8);
        memcpy(&start, ctl + SHMB_CTL_LOG_START_OFFSET_OFFSET, 8);
        memcpy(&active, ctl + SHMB_CTL_ACTIVE_SEGMENT_BASE_OFFSET_OFFSET, 8);
        memcpy(&end, ctl + SHMB_CTL_ACTIVE_SEGMENT_END_POSITION_OFFSET, 8);
        consistent = shmb_u64_load_seq_cst(ctl + SHMB_CTL_STATE_SEQ_OFFSET) == s1;
    }
    if (!consistent || offset < start || offset > hw)
        goto declined;
    if (offset == hw && wait_ms > 0 && !waited) {
        /* Nothing new: sleep here, then read once more, so that the records a wake-up
         * announces come back from this call (one call from the wake-up to the records; a
         * return to Python in between ran ~a dozen frames on the critical path). The segment
         * mapping is not held while asleep (a close elsewhere must not meet an export). */
        waited = 1;
        PyBuffer_Release(&mv);
        int r = tail_wait(ctl, hw_seq, wait_ms, spin_ns);
        if (r == SHMB_WAIT_INTERRUPTED && PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&cv);
            return NULL;
        }
        if (r != SHMB_WAIT_TIMEOUT && r != SHMB_WAIT_INTERRUPTED)
            goto again;
        if (PyObject_GetBuffer(args[1], &mv, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            PyBuffer_Release(&cv);
            return tail_declined();
        }
    }
    if (offset == hw) {
        result = Py_BuildValue("(iILOOOOO)", TAIL_NOTHING, hw_seq, (long long)hw, Py_None,
                               Py_None, Py_None, Py_None, Py_None);
        goto done;
    }
    if (active != segment_base || end <= 0 || (uint64_t)end > map_len || position < 0 ||
        position + SHMB_RB_HEADER_SIZE > end)
        goto declined;
    if (end > checked_end) {
        /* Never touch a page past the file's end (SIGBUS): the size must cover what the
         * partition published, as _SegmentFile.view checks. */
        struct stat sb;
        if (fstat((int)fd, &sb) < 0 || sb.st_size < end)
            goto declined;
        checked_end = end;
    }
    /* A hint a little behind offset: on to the batch holding it (a batch that does not
     * chain, or no whole one: declined, the Python read says what is wrong). */
    int64_t first = offset;
    if (hint_offset < offset) {
        shmb_rb_walk w;
        if (shmb_rb_walk_to(map, (size_t)end, (size_t)position, offset, hint_offset, -1, &w) !=
            SHMB_RB_WALK_FOUND)
            goto declined;
        position = (long long)w.position;
        first = w.base;
    }
    /* Whole batches from there, chained from its base, below hw, within max_bytes (the first
     * one whatever its size). Headers only here; shmb_rb_decode checks everything. */
    size_t pos = (size_t)position, stop = pos, limit;
    limit = (size_t)end;
    if (max_bytes > 0 && (size_t)position + (size_t)max_bytes < limit)
        limit = (size_t)position + (size_t)max_bytes;
    int64_t expected = first;
    for (int batches = 0; pos + SHMB_RB_HEADER_SIZE <= (size_t)end; batches++) {
        shmb_rb_header h;
        shmb_rb_header_read(map + pos, &h);
        if (h.magic != 2 || h.batch_length < SHMB_RB_BATCH_LENGTH_MIN ||
            h.last_offset_delta < 0)
            goto declined;
        size_t size = (size_t)h.batch_length + SHMB_RB_LOG_OVERHEAD;
        int64_t last = h.base_offset + h.last_offset_delta;
        if (h.base_offset != expected || pos + size > (size_t)end || last >= hw)
            break;
        if (batches > 0 && pos + size > limit)
            break;
        pos += size;
        stop = pos;
        expected = last + 1;
    }
    if (stop == (size_t)position)
        goto declined;
    const uint8_t *data = map + position;
    size_t len = stop - (size_t)position, n = 0;
    size_t cap = shmb_rb_count_records(data, len);
    if (owned_columns_alloc(&oc, cap) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    shmb_rb_error err;
    int status;
    if (len >= GIL_RELEASE_BYTES_MIN) {
        Py_BEGIN_ALLOW_THREADS
        status = shmb_rb_decode(data, len, verify_crc, &oc.cols, cap, &n, &err);
        Py_END_ALLOW_THREADS
    } else {
        status = shmb_rb_decode(data, len, verify_crc, &oc.cols, cap, &n, &err);
    }
    if (status != SHMB_RB_SCAN_OK || n == 0 || oc.cols.offsets[0] != first)
        goto declined;
    size_t skip = 0; /* records of the first batch before offset (after a walk) */
    while (skip < n && oc.cols.offsets[skip] < offset) /* bounded by n */
        skip++;
    if (skip == n)
        goto declined;
    PyObject *records = build_records(st, data, len, &oc.cols, n, topic, (int64_t)partition);
    if (records == NULL)
        goto done;
    if (skip > 0 && PyList_SetSlice(records, 0, (Py_ssize_t)skip, NULL) < 0) {
        Py_DECREF(records);
        goto done;
    }
    result = Py_BuildValue("(iILNLLLn)", TAIL_RECORDS, hw_seq, (long long)hw, records,
                           (long long)stop, (long long)expected, checked_end, (Py_ssize_t)len);
    goto done;
declined:
    result = tail_declined();
done:
    PyMem_RawFree(oc.memory);
    PyBuffer_Release(&mv);
    PyBuffer_Release(&cv);
    return result;
}

/* ==== ring_frame_at: a consumer's read of a committed ring frame (decision 0005 step 5) ==== */

static uint8_t *frame_at_alloc(void *ctx, size_t len)
{
    PyObject **bytes = ctx;
    *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    return *bytes == NULL ? NULL : (uint8_t *)PyBytes_AS_STRING(*bytes);
}

static PyObject *py_ring_frame_at(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    /* ring, control, offset, hint, batch_bytes_max, records_max */
    if (nargs != 6)
        return PyErr_Format(PyExc_TypeError, "ring_frame_at takes 6 arguments, got %zd", nargs);
    long long offset, bytes_max, records_max;
    unsigned long long hint;
    if (tail_ll(args[2], &offset) < 0 || tail_ll(args[4], &bytes_max) < 0 ||
        tail_ll(args[5], &records_max) < 0)
        return NULL;
    hint = PyLong_AsUnsignedLongLong(args[3]);
    if (hint == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (offset < 0)
        return PyErr_Format(PyExc_ValueError, "ring_frame_at: offset %lld < 0", offset);
    Py_buffer rv, cv;
    if (region_view(args[0], 0, &rv, "ring region") < 0)
        return NULL;
    if (region_view(args[1], 0, &cv, "control region") < 0) {
        PyBuffer_Release(&rv);
        return NULL;
    }
    if (cv.len < SHMB_CONTROL_REGISTRY_OFFSET) {
        PyBuffer_Release(&rv);
        PyBuffer_Release(&cv);
        return PyErr_Format(PyExc_ValueError, "ring_frame_at: control region too short");
    }
    PyObject *copy = NULL;
    shmb_ring_found found;
    int status = shmb_ring_frame_at(rv.buf, (size_t)rv.len, cv.buf, offset, hint, bytes_max,
                                    records_max, frame_at_alloc, &copy, &found);
    PyBuffer_Release(&rv);
    PyBuffer_Release(&cv);
    if (copy == NULL && PyErr_Occurred())
        return NULL;
    PyObject *payload = status == SHMB_FRAME_AT_FOUND ? copy : Py_None;
    PyObject *result = Py_BuildValue("(iOLKK)", status, payload, (long long)found.base,
                                     (unsigned long long)found.span,
                                     (unsigned long long)found.next_hint);
    Py_XDECREF(copy);
    return result;
}

/* consumer.COMMIT_ONLY_SLEEP_MS_MAX: the sleep on the commit word alone is cut to this. */
#define RING_POLL_COMMIT_ONLY_MS_MAX 500
/* Frames (and payload bytes) one ring_take takes from a ring at most. */
#define RING_POLL_FRAMES_MAX 64
#define RING_POLL_BYTES_MAX (1 << 20)

/* ==== ring_take: a caught-up consumer's ring read, its wait and its decode in one call ===== */

/* Sleeps until a producer commits (commit_seq != seen_commit) or, unless beyond_taken (no
 * producer took the offset yet: a publish cannot bring it), the partition publishes (hw_seq
 * != seen_hw), as ControlRegion.wait_commit / wait_commit_or_hw do: spin first (not counted),
 * then counted in the waiter words for the sleep (Dekker with the producer's commit_wake and
 * the partition's publish). The GIL is released. */
static int ring_poll_wait(uint8_t *ctl, uint32_t seen_commit, uint32_t seen_hw,
                          int beyond_taken, int64_t wait_ms, int64_t spin_ns)
{
    uint32_t *commit = (uint32_t *)(ctl + SHMB_CTL_COMMIT_SEQ_OFFSET);
    uint32_t *hw = (uint32_t *)(ctl + SHMB_CTL_HW_SEQ_OFFSET);
    const uint32_t *words[2] = {commit, hw};
    const uint32_t expected[2] = {seen_commit, seen_hw};
    size_t n = beyond_taken ? 1 : 2, which;
    int r;
    if (beyond_taken && wait_ms > RING_POLL_COMMIT_ONLY_MS_MAX)
        wait_ms = RING_POLL_COMMIT_ONLY_MS_MAX;
    Py_BEGIN_ALLOW_THREADS
    int64_t start = shmb_monotonic_ns();
    r = SHMB_WAIT_TIMEOUT;
    if (spin_ns > 0) {
        r = n == 1 ? (shmb_spin_until_changed(commit, seen_commit, spin_ns) ? SHMB_WAIT_CHANGED
                                                                           : SHMB_WAIT_TIMEOUT)
                   : shmb_futex_waitv(words, expected, n, 0, spin_ns, &which);
    }
    if (r == SHMB_WAIT_TIMEOUT || r == SHMB_FUTEX_WAITV_UNSUPPORTED) {
        int64_t left_ms = wait_ms - (shmb_monotonic_ns() - start) / 1000000;
        if (left_ms < 0)
            left_ms = 0;
        (void)shmb_u32_fetch_add(ctl + SHMB_CTL_COMMIT_WAITERS_OFFSET, 1);
        if (n == 2)
            shmb_ctl_hw_waiter_enter(ctl);
        r = n == 1 ? shmb_futex_wait(commit, seen_commit, left_ms, 0)
                   : shmb_futex_waitv(words, expected, n, left_ms, 0, &which);
        if (r == SHMB_FUTEX_WAITV_UNSUPPORTED) /* Linux < 5.16: the commit word, a short nap */
            r = shmb_futex_wait(commit, seen_commit, left_ms < 1 ? left_ms : 1, 0);
        if (n == 2)
            shmb_ctl_hw_waiter_leave(ctl);
        (void)shmb_u32_fetch_add(ctl + SHMB_CTL_COMMIT_WAITERS_OFFSET, (uint32_t)-1);
    }
    Py_END_ALLOW_THREADS
    return r;
}

/* The frame copy of ring_poll_frame: on the stack up to RING_POLL_STACK_BYTES (a latency
 * poll's frame), else a heap block. The copy only has to outlive the decode (build_records
 * copies keys and values out of it), so it needs no Python object (~150 instructions a poll
 * less than a bytes object; perf/RESULTS.md, seventeenth session). */
#define RING_POLL_STACK_BYTES 2048
#define RING_POLL_STACK_RECORDS 16
typedef struct {
    uint8_t *stack;
    uint8_t *heap; /* PyMem_RawMalloc'd when the frame is larger than the stack buffer */
    int failed;
} poll_copy;

static uint8_t *poll_copy_alloc(void *ctx, size_t len)
{
    poll_copy *c = ctx;
    if (len <= RING_POLL_STACK_BYTES)
        return c->stack;
    c->heap = PyMem_RawMalloc(len ? len : 1);
    if (c->heap == NULL)
        c->failed = 1;
    return c->heap;
}

/* One ring frame for ring_take: shmb_ring_frame_at, and on FOUND its records decoded into
 * *records (a new list). Returns the FRAME_AT status, or -1 with a Python error set. */
static int ring_poll_frame(module_state *st, Py_buffer *rv, uint8_t *ctl, int64_t offset,
                           uint64_t hint, long long bytes_max, long long records_max,
                           PyObject *topic, long long partition, shmb_ring_found *f,
                           PyObject **records)
{
    uint8_t stack[RING_POLL_STACK_BYTES];
    poll_copy copy = {stack, NULL, 0};
    *records = NULL;
    int status = shmb_ring_frame_at(rv->buf, (size_t)rv->len, ctl, offset, hint, bytes_max,
                                    records_max, poll_copy_alloc, &copy, f);
    if (copy.failed) {
        PyErr_NoMemory();
        return -1;
    }
    if (status != SHMB_FRAME_AT_FOUND) {
        PyMem_RawFree(copy.heap);
        return status;
    }
    const uint8_t *data = copy.heap != NULL ? copy.heap : stack;
    size_t len = f->payload_len, got = 0, cap = shmb_rb_count_records(data, len);
    /* The columns: on the stack for a few records (a latency poll's one), else one block. */
    int64_t wide[5][RING_POLL_STACK_RECORDS];
    int32_t narrow[3][RING_POLL_STACK_RECORDS];
    owned_columns oc = {{0}, NULL};
    if (cap <= RING_POLL_STACK_RECORDS) {
        oc.cols.offsets = wide[0];
        oc.cols.timestamps = wide[1];
        oc.cols.key_starts = wide[2];
        oc.cols.value_starts = wide[3];
        oc.cols.headers_starts = wide[4];
        oc.cols.key_lengths = narrow[0];
        oc.cols.value_lengths = narrow[1];
        oc.cols.headers_counts = narrow[2];
    } else if (owned_columns_alloc(&oc, cap) < 0) {
        PyMem_RawFree(copy.heap);
        PyErr_NoMemory();
        return -1;
    }
    shmb_rb_error err;
    /* The CRC and every record were checked by shmb_frame_ok already. */
    if (shmb_rb_decode(data, len, 0, &oc.cols, cap, &got, &err) != SHMB_RB_SCAN_OK) {
        PyMem_RawFree(oc.memory); /* cannot happen after shmb_frame_ok */
        PyMem_RawFree(copy.heap);
        return SHMB_FRAME_AT_REFUSED;
    }
    *records = build_records(st, data, len, &oc.cols, got, topic, (int64_t)partition);
    PyMem_RawFree(oc.memory);
    PyMem_RawFree(copy.heap);
    return *records == NULL ? -1 : SHMB_FRAME_AT_FOUND;
}

/* What one ring_poll_run found: on FOUND, records (a new list) from frames of ring `index`
 * holding offsets [base, base + span), and the hint for the frame after them. */
typedef struct {
    int status;
    int beyond;
    uint32_t seen_commit;
    PyObject *records;
    int64_t base;
    uint64_t span;
    Py_ssize_t index;
    uint64_t next_hint;
} ring_poll_out;

/* The look, the sleep and the second look of ring_take: the rings (a list of mappings) with
 * their hints (one per ring). 0, or -1 with a Python error set. */
static int ring_poll_run(module_state *st, uint8_t *ctl, PyObject *rings, const uint64_t *hints,
                         long long offset, long long bytes_max, long long records_max,
                         PyObject *topic, long long partition, long long wait_ms,
                         long long spin_ns, long long seen_hw, ring_poll_out *out)
{
    out->status = SHMB_FRAME_AT_NONE;
    out->beyond = 0;
    out->seen_commit = 0;
    out->records = NULL;
    out->base = -1;
    out->span = 0;
    out->index = -1;
    out->next_hint = 0;
    for (int attempt = 0; attempt < 2; attempt++) { /* a look, a sleep, a second look */
        /* Before the look: a commit after this load wakes the sleep, and an offset taken
         * after the next load comes with such a commit. */
        out->seen_commit = shmb_u32_load_acquire(ctl + SHMB_CTL_COMMIT_SEQ_OFFSET);
        uint64_t taken = shmb_u64_load_acquire(ctl + SHMB_CTL_NEXT_OFFSET_OFFSET);
        int status = SHMB_FRAME_AT_NONE;
        Py_ssize_t n = PyList_GET_SIZE(rings);
        for (Py_ssize_t i = 0; i < n && status == SHMB_FRAME_AT_NONE; i++) {
            Py_buffer rv;
            if (region_view(PyList_GET_ITEM(rings, i), 0, &rv, "ring region") < 0)
                return -1;
            shmb_ring_found f;
            PyObject *records = NULL;
            status = ring_poll_frame(st, &rv, ctl, offset, hints[i], bytes_max, records_max,
                                     topic, partition, &f, &records);
            if (status < 0) {
                PyBuffer_Release(&rv);
                return -1;
            }
            if (status != SHMB_FRAME_AT_FOUND) {
                PyBuffer_Release(&rv);
                continue;
            }
            /* The frames after it in the same ring, while they continue it: a consumer that
             * fell behind a producer takes them in one call (bounded in frames and bytes). */
            int64_t base = f.base;
            uint64_t end_offset = (uint64_t)f.base + f.span, next_hint = f.next_hint;
            size_t bytes = f.payload_len;
            for (int k = 1; k < RING_POLL_FRAMES_MAX && bytes < RING_POLL_BYTES_MAX; k++) {
                PyObject *more = NULL;
                int s2 = ring_poll_frame(st, &rv, ctl, (int64_t)end_offset, next_hint, bytes_max,
                                         records_max, topic, partition, &f, &more);
                if (s2 < 0) {
                    Py_DECREF(records);
                    PyBuffer_Release(&rv);
                    return -1;
                }
                if (s2 != SHMB_FRAME_AT_FOUND || (uint64_t)f.base != end_offset)
                    break;
                Py_ssize_t at = PyList_GET_SIZE(records);
                int bad = PyList_SetSlice(records, at, at, more);
                Py_DECREF(more);
                if (bad < 0) {
                    Py_DECREF(records);
                    PyBuffer_Release(&rv);
                    return -1;
                }
                end_offset += f.span;
                next_hint = f.next_hint;
                bytes += f.payload_len;
            }
            PyBuffer_Release(&rv);
            out->status = SHMB_FRAME_AT_FOUND;
            out->records = records;
            out->base = base;
            out->span = end_offset - (uint64_t)base;
            out->index = i;
            out->next_hint = next_hint;
            return 0;
        }
        out->status = status;
        if (status != SHMB_FRAME_AT_NONE)
            return 0; /* TORN or REFUSED: the log will have it */
        out->beyond = !(taken & SHMB_NEXT_OFFSET_UNSET) && (uint64_t)offset >= taken;
        if (attempt > 0 || wait_ms <= 0)
            return 0;
        /* Taken, in no ring, and the partition published past it: it is in the log now (its
         * frame was released before this look). No sleep: it would return at once on hw_seq,
         * and counting in hw_waiters would wake a dozing partition for nothing. */
        if (!out->beyond &&
            (int64_t)shmb_u64_load_acquire(ctl + SHMB_CTL_HIGH_WATERMARK_OFFSET) > offset)
            return 0;
        int r = ring_poll_wait(ctl, out->seen_commit, (uint32_t)seen_hw, out->beyond, wait_ms,
                               spin_ns);
        if (r == SHMB_WAIT_INTERRUPTED && PyErr_CheckSignals() < 0)
            return -1;
        if (r == SHMB_WAIT_TIMEOUT || r == SHMB_WAIT_INTERRUPTED)
            return 0;
    }
    return 0;
}

/* Room for ring_poll_run's hints: buf (RING_TAKE_RINGS_MAX) or a new array
 * (*owned, to free). NULL with a Python error set on failure. */
#define RING_TAKE_RINGS_MAX 32

static uint64_t *hints_array(Py_ssize_t n, uint64_t *buf, uint64_t **owned)
{
    *owned = NULL;
    if (n <= RING_TAKE_RINGS_MAX)
        return buf;
    *owned = PyMem_Malloc(sizeof(uint64_t) * (size_t)n);
    if (*owned == NULL)
        PyErr_NoMemory();
    return *owned;
}

/* ring_take(control, rings, hints, hint_froms, offset, registry_seen, records_max, topic,
 * partition, wait_ms, spin_ns, seen_hw_seq) -> (status, records, at, end, seen_commit, beyond):
 * RingReads.take, a caught-up consumer's whole ring read in one call. RingReads._readable's
 * checks first (DECLINED when ring reads are off, the partition stopped cleanly, or the
 * registry changed since registry_seen: Python refreshes and calls again); a ring's hint
 * counts for offsets from its hint_from on; on FOUND the ring's hint and hint_from are set in
 * the lists, `at` is the index of the record at offset (len(records) if it is not there),
 * `end` the offset after the frames read. */
#define RING_TAKE_DECLINED (-1)

/* ring_take's result tuple, built directly (Py_BuildValue parses its format on every call:
 * ~400 instructions of a latency poll's ~4,500). `records` is stolen (NULL: None). */
static PyObject *take_result(int status, PyObject *records, Py_ssize_t at, long long end,
                             uint32_t seen_commit, int beyond)
{
    PyObject *t = PyTuple_New(6);
    if (t == NULL) {
        Py_XDECREF(records);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, PyLong_FromLong(status));
    PyTuple_SET_ITEM(t, 1, records != NULL ? records : Py_NewRef(Py_None));
    PyTuple_SET_ITEM(t, 2, PyLong_FromSsize_t(at));
    PyTuple_SET_ITEM(t, 3, PyLong_FromLongLong(end));
    PyTuple_SET_ITEM(t, 4, PyLong_FromUnsignedLong(seen_commit));
    PyTuple_SET_ITEM(t, 5, PyLong_FromLong(beyond));
    for (int i = 0; i < 6; i++) /* a failed conversion left a NULL: the tuple frees the rest */
        if (PyTuple_GET_ITEM(t, i) == NULL) {
            Py_DECREF(t);
            return NULL;
        }
    return t;
}

/* What ring_take found: its result tuple's fields; `records` a new reference or NULL. */
typedef struct {
    int status;
    PyObject *records;
    Py_ssize_t at;
    long long end;
    uint32_t seen_commit;
    int beyond;
} take_out;

/* ring_take on parsed arguments (shared by py_ring_take and poll_ring): 0 with *out set
 * (status RING_TAKE_DECLINED included), or -1 with a Python error set. */
static int ring_take_run(module_state *st, PyObject *control, PyObject *rings, PyObject *hints,
                         PyObject *froms, long long offset, long long registry_seen,
                         long long records_max, PyObject *topic, long long partition,
                         long long wait_ms, long long spin_ns, long long seen_hw, take_out *out)
{
    *out = (take_out){RING_TAKE_DECLINED, NULL, 0, -1, 0, 0};
    if (!PyList_CheckExact(rings) || !PyList_CheckExact(hints) || !PyList_CheckExact(froms) ||
        PyList_GET_SIZE(rings) != PyList_GET_SIZE(hints) ||
        PyList_GET_SIZE(rings) != PyList_GET_SIZE(froms)) {
        PyErr_SetString(PyExc_TypeError,
                        "ring_take: rings, hints and hint_froms: lists of one length");
        return -1;
    }
    if (topic != Py_None && !PyUnicode_CheckExact(topic)) {
        PyErr_SetString(PyExc_TypeError, "ring_take: topic must be str or None");
        return -1;
    }
    if (offset < 0 || wait_ms < 0 || spin_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "ring_take: negative offset, wait_ms or spin_ns");
        return -1;
    }
    Py_buffer cv;
    if (region_view(control, 0, &cv, "control region") < 0)
        return -1;
    if (cv.len < SHMB_CONTROL_REGISTRY_OFFSET) {
        PyBuffer_Release(&cv);
        PyErr_SetString(PyExc_ValueError, "ring_take: control region too short");
        return -1;
    }
    uint8_t *ctl = cv.buf;
    long long bytes_max = (long long)shmb_u64_load_acquire(ctl + SHMB_CTL_BATCH_BYTES_MAX_OFFSET);
    if (!shmb_u32_load_acquire(ctl + SHMB_CTL_RING_READS_OFFSET) ||
        shmb_u32_load_acquire(ctl + SHMB_CTL_PARTITION_STATUS_OFFSET) ==
            SHMB_PARTITION_STATUS_STOPPED ||
        bytes_max <= 0 ||
        shmb_u32_load_acquire(ctl + SHMB_CTL_REGISTRY_CHANGES_OFFSET) != (uint32_t)registry_seen ||
        registry_seen < 0) {
        PyBuffer_Release(&cv);
        return 0; /* declined */
    }
    Py_ssize_t n = PyList_GET_SIZE(rings);
    uint64_t hint_buf[RING_TAKE_RINGS_MAX], *owned;
    uint64_t *hint_values = hints_array(n, hint_buf, &owned);
    if (hint_values == NULL) {
        PyBuffer_Release(&cv);
        return -1;
    }
    int rc = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        long long from = PyLong_AsLongLong(PyList_GET_ITEM(froms, i));
        unsigned long long hint = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(hints, i));
        if (PyErr_Occurred())
            goto done;
        hint_values[i] = offset >= from ? hint : 0;
    }
    ring_poll_out o;
    if (ring_poll_run(st, ctl, rings, hint_values, offset, bytes_max, records_max, topic,
                      partition, wait_ms, spin_ns, seen_hw, &o) < 0)
        goto done;
    out->status = o.status;
    out->seen_commit = o.seen_commit;
    if (o.status != SHMB_FRAME_AT_FOUND) {
        out->beyond = o.beyond;
        rc = 0;
        goto done;
    }
    long long end_offset = (long long)(o.base + (int64_t)o.span);
    PyObject *next = PyLong_FromUnsignedLongLong(o.next_hint);
    PyObject *from = next ? PyLong_FromLongLong(end_offset) : NULL;
    if (from == NULL || PyList_SetItem(hints, o.index, next) < 0) {
        Py_XDECREF(next);
        Py_XDECREF(from);
        Py_DECREF(o.records);
        goto done;
    }
    if (PyList_SetItem(froms, o.index, from) < 0) {
        Py_DECREF(o.records);
        goto done;
    }
    /* The record at the offset: ring frames hold records at every offset (shmb_frame_ok
     * refuses empty batches, the batch check offset gaps), so it is at offset - base;
     * len(records) says "none" should that ever not hold. */
    Py_ssize_t count = PyList_GET_SIZE(o.records), at = (Py_ssize_t)(offset - o.base);
    if (at < 0 || at >= count ||
        ((RecordObject *)PyList_GET_ITEM(o.records, at))->offset != offset)
        at = count;
    out->records = o.records;
    out->at = at;
    out->end = end_offset;
    rc = 0;
done:
    PyBuffer_Release(&cv);
    PyMem_Free(owned);
    return rc;
}

static PyObject *py_ring_take(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 12)
        return PyErr_Format(PyExc_TypeError, "ring_take takes 12 arguments, got %zd", nargs);
    long long offset, registry_seen, records_max, partition, wait_ms, spin_ns, seen_hw;
    if (tail_ll(args[4], &offset) < 0 || tail_ll(args[5], &registry_seen) < 0 ||
        tail_ll(args[6], &records_max) < 0 || tail_ll(args[8], &partition) < 0 ||
        tail_ll(args[9], &wait_ms) < 0 || tail_ll(args[10], &spin_ns) < 0 ||
        tail_ll(args[11], &seen_hw) < 0)
        return NULL;
    take_out o;
    if (ring_take_run(get_state(module), args[0], args[1], args[2], args[3], offset,
                      registry_seen, records_max, args[7], partition, wait_ms, spin_ns, seen_hw,
                      &o) < 0)
        return NULL;
    return take_result(o.status, o.records, o.at, o.end, o.seen_commit, o.beyond);
}

static PyObject *py_ring_check(PyObject *module, PyObject *arg)
{
    Py_buffer v;
    if (region_view(arg, 0, &v, "ring_check") < 0)
        return NULL;
    uint64_t capacity;
    shmb_ring_error err;
    int r = shmb_ring_check(v.buf, (size_t)v.len, &capacity, &err);
    PyBuffer_Release(&v);
    if (r != SHMB_RING_OK)
        return raise_ring_corrupt(get_state(module), &err);
    return PyLong_FromUnsignedLongLong(capacity);
}

/* Payload views for ring_write: one bytes-like object or a sequence of them. */
typedef struct {
    Py_buffer *views;
    shmb_ring_payload *payloads;
    Py_ssize_t n;
    size_t total;
} payload_hold;

static void payload_hold_free(payload_hold *h)
{
    for (Py_ssize_t i = 0; i < h->n; i++)
        PyBuffer_Release(&h->views[i]);
    PyMem_Free(h->views);
    PyMem_Free(h->payloads);
}

static int payload_hold_init(payload_hold *h, PyObject *payloads)
{
    memset(h, 0, sizeof *h);
    PyObject *seq;
    if (PyObject_CheckBuffer(payloads))
        seq = PyTuple_Pack(1, payloads);
    else
        seq = PySequence_Fast(payloads, "ring_write: payloads must be a bytes-like object or a "
                                        "sequence of them");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    h->views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    h->payloads = PyMem_Calloc((size_t)n + 1, sizeof(shmb_ring_payload));
    if (h->views == NULL || h->payloads == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &h->views[i],
                               PyBUF_C_CONTIGUOUS) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        h->n = i + 1;
        h->payloads[i].data = h->views[i].buf;
        h->payloads[i].len = (size_t)h->views[i].len;
        h->total += (size_t)h->views[i].len;
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *py_ring_write(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ring", "payloads", "doorbell", "die_before_commit", NULL};
    PyObject *ring, *payloads, *doorbell = Py_None;
    int die_before_commit = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|Op:ring_write", kwlist, &ring, &payloads,
                                     &doorbell, &die_before_commit))
        return NULL;
    Py_buffer rv, dv = {0};
    if (region_view(ring, 1, &rv, "ring_write") < 0)
        return NULL;
    if (doorbell != Py_None) {
        if (region_view(doorbell, 1, &dv, "ring_write doorbell") < 0) {
            PyBuffer_Release(&rv);
            return NULL;
        }
        if (dv.len < SHMB_CONTROL_REGISTRY_OFFSET) {
            PyErr_SetString(PyExc_ValueError, "ring_write: doorbell is not a control region");
            PyBuffer_Release(&dv);
            PyBuffer_Release(&rv);
            return NULL;
        }
    }
    payload_hold h;
    PyObject *result = NULL;
    if (payload_hold_init(&h, payloads) < 0)
        goto done;
    size_t written;
    uint64_t first_seq;
    int64_t first_offset;
    shmb_ring_error err;
    int r;
    if (die_before_commit) /* tests only: a kill -9 between the reservation and the commit */
        shmb_ring_write_then_die(rv.buf, (size_t)rv.len, dv.buf, h.payloads, (size_t)h.n);
    if (h.total >= GIL_RELEASE_BYTES_MIN) {
        Py_BEGIN_ALLOW_THREADS
        r = shmb_ring_write(rv.buf, (size_t)rv.len, dv.buf, h.payloads, (size_t)h.n, &written,
                            &first_seq, &first_offset, &err);
        if (written > 0 && dv.buf != NULL)
            shmb_ctl_doorbell_ring(dv.buf);
        Py_END_ALLOW_THREADS
    } else {
        r = shmb_ring_write(rv.buf, (size_t)rv.len, dv.buf, h.payloads, (size_t)h.n, &written,
                            &first_seq, &first_offset, &err);
        if (written > 0 && dv.buf != NULL)
            shmb_ctl_doorbell_ring(dv.buf);
    }
    if (r == SHMB_RING_BAD_PAYLOAD) {
        PyErr_Format(get_state(module)->errors[SHMB_RB_SCAN_TRUNCATED],
                     "payload %zu of %zu bytes is shorter than a record batch header (%d "
                     "bytes)", written, h.payloads[written].len, SHMB_RB_HEADER_SIZE);
    } else if (r == SHMB_RING_CORRUPT) {
        raise_ring_corrupt(get_state(module), &err);
    } else if (r == SHMB_RING_TOO_LARGE) {
        uint64_t cap = shmb_u64_load_relaxed((uint8_t *)rv.buf + SHMB_RING_CAPACITY_OFFSET);
        PyErr_Format(get_state(module)->errors[SHMB_RB_SCAN_TOO_LARGE],
                     "payload %zu of %zu bytes is larger than this ring can ever hold "
                     "(%llu bytes, capacity %llu)", written, h.payloads[written].len,
                     (unsigned long long)shmb_ring_payload_bytes_max(cap),
                     (unsigned long long)cap);
    } else {
        result = Py_BuildValue("(iKn)", r, (unsigned long long)first_seq, (Py_ssize_t)written);
    }
done:
    payload_hold_free(&h);
    if (dv.buf != NULL)
        PyBuffer_Release(&dv);
    PyBuffer_Release(&rv);
    return result;
}

#define RING_READ_CHUNK 256

/* Collects frame descriptors for ring_read/ring_scan into a growing array. */
typedef struct {
    shmb_ring_frame *frames;
    size_t count, cap;
    uint64_t bytes;
    uint64_t next_position;
} frame_list;

static int collect_frames(module_state *st, Py_buffer *rv, uint64_t position, uint64_t seq,
                          uint64_t max_bytes, uint64_t frames_max, frame_list *fl)
{
    memset(fl, 0, sizeof *fl);
    fl->next_position = position;
    for (;;) {
        if (fl->count == fl->cap) {
            size_t cap = fl->cap ? fl->cap * 2 : RING_READ_CHUNK;
            shmb_ring_frame *f = PyMem_Realloc(fl->frames, cap * sizeof *f);
            if (f == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            fl->frames = f;
            fl->cap = cap;
        }
        size_t room = fl->cap - fl->count, n = 0;
        if (room > frames_max - fl->count)
            room = (size_t)(frames_max - fl->count);
        shmb_ring_error err;
        int r = shmb_ring_read(rv->buf, (size_t)rv->len, fl->next_position, seq + fl->count,
                               max_bytes - fl->bytes, fl->count == 0, fl->frames + fl->count,
                               room, &n, &fl->next_position, &err);
        if (r != SHMB_RING_OK) {
            raise_ring_corrupt(st, &err);
            return -1;
        }
        for (size_t i = 0; i < n; i++)
            fl->bytes += fl->frames[fl->count + i].payload_len;
        fl->count += n;
        if (n < room || fl->count >= frames_max)
            return 0;
    }
}

static int read_args(PyObject *args, PyObject *kwds, const char *fmt, PyObject **ring,
                     unsigned long long *position, unsigned long long *seq,
                     long long *max_bytes, long long *frames_max)
{
    static char *kwlist[] = {"ring", "position", "expected_sequence", "max_bytes", "frames_max",
                             NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, fmt, kwlist, ring, position, seq, max_bytes,
                                     frames_max))
        return -1;
    if (*max_bytes < 0 || *frames_max <= 0) {
        PyErr_SetString(PyExc_ValueError, "max_bytes must be >= 0 and frames_max > 0");
        return -1;
    }
    return 0;
}

static void copy_payloads(char *dst, const uint8_t *src, const frame_list *fl)
{
    for (size_t i = 0, at = 0; i < fl->count; i++) {
        memcpy(dst + at, src + fl->frames[i].payload_offset, fl->frames[i].payload_len);
        at += fl->frames[i].payload_len;
    }
}

static PyObject *py_ring_read(PyObject *module, PyObject *args, PyObject *kwds)
{
    PyObject *ring;
    unsigned long long position, seq;
    long long max_bytes = 1 << 20, frames_max = 1 << 16;
    if (read_args(args, kwds, "OKK|LL:ring_read", &ring, &position, &seq, &max_bytes,
                  &frames_max) < 0)
        return NULL;
    Py_buffer rv;
    if (region_view(ring, 0, &rv, "ring_read") < 0)
        return NULL;
    frame_list fl;
    PyObject *data = NULL, *result = NULL;
    if (collect_frames(get_state(module), &rv, position, seq, (uint64_t)max_bytes,
                       (uint64_t)frames_max, &fl) < 0)
        goto done;
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)fl.bytes);
    if (data == NULL)
        goto done;
    char *dst = PyBytes_AS_STRING(data);
    if (fl.bytes >= GIL_RELEASE_BYTES_MIN) {
        Py_BEGIN_ALLOW_THREADS
        copy_payloads(dst, rv.buf, &fl);
        Py_END_ALLOW_THREADS
    } else {
        copy_payloads(dst, rv.buf, &fl);
    }
    result = Py_BuildValue("(KnO)", (unsigned long long)fl.next_position, (Py_ssize_t)fl.count,
                           data);
done:
    Py_XDECREF(data);
    PyMem_Free(fl.frames);
    PyBuffer_Release(&rv);
    return result;
}

static PyObject *py_ring_scan(PyObject *module, PyObject *args, PyObject *kwds)
{
    PyObject *ring;
    unsigned long long position, seq;
    long long max_bytes = 1 << 20, frames_max = 1 << 16;
    if (read_args(args, kwds, "OKK|LL:ring_scan", &ring, &position, &seq, &max_bytes,
                  &frames_max) < 0)
        return NULL;
    Py_buffer rv;
    if (region_view(ring, 0, &rv, "ring_scan") < 0)
        return NULL;
    frame_list fl;
    PyObject *spans = NULL, *result = NULL;
    if (collect_frames(get_state(module), &rv, position, seq, (uint64_t)max_bytes,
                       (uint64_t)frames_max, &fl) < 0)
        goto done;
    spans = PyList_New((Py_ssize_t)fl.count);
    if (spans == NULL)
        goto done;
    for (size_t i = 0; i < fl.count; i++) {
        PyObject *t = Py_BuildValue("(KI)", (unsigned long long)fl.frames[i].payload_offset,
                                    (unsigned int)fl.frames[i].payload_len);
        if (t == NULL)
            goto done;
        PyList_SET_ITEM(spans, (Py_ssize_t)i, t);
    }
    result = Py_BuildValue("(KO)", (unsigned long long)fl.next_position, spans);
done:
    Py_XDECREF(spans);
    PyMem_Free(fl.frames);
    PyBuffer_Release(&rv);
    return result;
}

static PyObject *py_ring_release(PyObject *module, PyObject *args)
{
    PyObject *ring;
    unsigned long long position;
    if (!PyArg_ParseTuple(args, "OK:ring_release", &ring, &position))
        return NULL;
    Py_buffer rv;
    if (region_view(ring, 1, &rv, "ring_release") < 0)
        return NULL;
    shmb_ring_error err;
    int r = shmb_ring_release(rv.buf, (size_t)rv.len, position, &err);
    PyBuffer_Release(&rv);
    if (r != SHMB_RING_OK)
        return raise_ring_corrupt(get_state(module), &err);
    Py_RETURN_NONE;
}

static PyObject *py_ring_fits(PyObject *module, PyObject *args)
{
    PyObject *ring;
    unsigned long long len;
    if (!PyArg_ParseTuple(args, "OK:ring_fits", &ring, &len))
        return NULL;
    Py_buffer rv;
    if (region_view(ring, 0, &rv, "ring_fits") < 0)
        return NULL;
    shmb_ring_error err;
    int r = shmb_ring_fits(rv.buf, (size_t)rv.len, len);
    if (r < 0)
        shmb_ring_check(rv.buf, (size_t)rv.len, NULL, &err);
    PyBuffer_Release(&rv);
    if (r < 0)
        return raise_ring_corrupt(get_state(module), &err);
    return PyBool_FromLong(r);
}

/* Waits for room for a payload; True when it fits, False on timeout or on a wake-up without
 * room. Signals are checked (a KeyboardInterrupt propagates) and the wait goes on for the time
 * left. */
static PyObject *py_ring_wait_space(PyObject *module, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ring", "payload_bytes", "timeout_ms", "spin_ns", NULL};
    PyObject *ring;
    unsigned long long len;
    long long timeout_ms = -1, spin_ns = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OK|LL:ring_wait_space", kwlist, &ring, &len,
                                     &timeout_ms, &spin_ns))
        return NULL;
    Py_buffer rv;
    if (region_view(ring, 1, &rv, "ring_wait_space") < 0)
        return NULL;
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : shmb_monotonic_ns() + timeout_ms * 1000000;
    int r;
    for (;;) {
        int64_t left_ms = -1;
        if (deadline != INT64_MAX) {
            int64_t left = deadline - shmb_monotonic_ns();
            left_ms = left <= 0 ? 0 : (left + 999999) / 1000000;
        }
        Py_BEGIN_ALLOW_THREADS
        r = shmb_ring_wait_space(rv.buf, (size_t)rv.len, len, left_ms, spin_ns);
        Py_END_ALLOW_THREADS
        if (r != SHMB_WAIT_INTERRUPTED)
            break;
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&rv);
            return NULL;
        }
    }
    if (r < 0) {
        shmb_ring_error err;
        shmb_ring_check(rv.buf, (size_t)rv.len, NULL, &err);
        PyBuffer_Release(&rv);
        return raise_ring_corrupt(get_state(module), &err);
    }
    PyBuffer_Release(&rv);
    return PyBool_FromLong(r == SHMB_WAIT_CHANGED);
}

/* rings_wait_quiet(rings, quiet_us, timeout_ms, poke) -> index of the quiet idle ring, -1 on
 * timeout, -2 when poke[0] became non-zero. The GIL is released while it naps; this is the
 * producer's background sender thread, so signals are the main thread's business. */
static PyObject *py_rings_wait_quiet(PyObject *module, PyObject *args)
{
    PyObject *rings, *poke_obj;
    long long quiet_us, timeout_ms;
    if (!PyArg_ParseTuple(args, "OLLO:rings_wait_quiet", &rings, &quiet_us, &timeout_ms,
                          &poke_obj))
        return NULL;
    PyObject *seq = PySequence_Fast(rings, "rings_wait_quiet: rings must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > SHMB_QUIET_RINGS_MAX || quiet_us < 1) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "rings_wait_quiet: 1..%d rings and quiet_us >= 1",
                            SHMB_QUIET_RINGS_MAX);
    }
    Py_buffer views[SHMB_QUIET_RINGS_MAX], poke;
    uint8_t *regions[SHMB_QUIET_RINGS_MAX];
    size_t lens[SHMB_QUIET_RINGS_MAX], which = 0;
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(poke_obj, &poke, PyBUF_WRITABLE) < 0)
        goto done_seq;
    if (poke.len < 1) {
        PyErr_SetString(PyExc_ValueError, "rings_wait_quiet: poke must hold a byte");
        goto done;
    }
    for (; got < n; got++) {
        if (region_view(PySequence_Fast_GET_ITEM(seq, got), 0, &views[got],
                        "rings_wait_quiet") < 0)
            goto done;
        regions[got] = views[got].buf;
        lens[got] = (size_t)views[got].len;
    }
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = shmb_rings_wait_quiet(regions, lens, (size_t)n, quiet_us * 1000, timeout_ms,
                              (const volatile uint8_t *)poke.buf, &which);
    Py_END_ALLOW_THREADS
    if (r < 0) {
        shmb_ring_error err;
        shmb_ring_check(regions[which], lens[which], NULL, &err);
        raise_ring_corrupt(get_state(module), &err);
    } else {
        result = PyLong_FromLong(r == SHMB_WAIT_CHANGED ? (long)which
                                 : r == SHMB_WAIT_TIMEOUT ? -1 : -2);
    }
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyBuffer_Release(&poke);
done_seq:
    Py_DECREF(seq);
    return result;
}

/* The doorbell and waiter calls on a control region: a writable view of it (checked to be
 * one), `fn` on it, released. */
static PyObject *control_call(PyObject *obj, void (*fn)(uint8_t *), const char *what)
{
    Py_buffer v;
    if (region_view(obj, 1, &v, what) < 0)
        return NULL;
    if (v.len < SHMB_CONTROL_REGISTRY_OFFSET) {
        PyBuffer_Release(&v);
        return PyErr_Format(PyExc_ValueError, "%s: not a control region", what);
    }
    fn(v.buf);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *py_doorbell_ring_urgent(PyObject *module, PyObject *arg)
{
    return control_call(arg, shmb_ctl_doorbell_ring_urgent, "doorbell_ring_urgent");
}

static PyObject *py_hw_waiter(PyObject *module, PyObject *args)
{
    PyObject *obj;
    int enter;
    if (!PyArg_ParseTuple(args, "Op:hw_waiter", &obj, &enter))
        return NULL;
    return control_call(obj, enter ? shmb_ctl_hw_waiter_enter : shmb_ctl_hw_waiter_leave,
                        "hw_waiter");
}

static PyObject *py_doorbell_ring(PyObject *module, PyObject *arg)
{
    return control_call(arg, shmb_ctl_doorbell_ring, "doorbell_ring");
}

/* ==== RecordAccumulator ===================================================================== */

/* A producer's batch under construction (shmb/accumulator.h): `send` encodes its record here at
 * once, so a batch is written to the ingress ring by one call with no Python object per record
 * (producer.py keeps only the futures). Not thread-safe: the Producer holds its lock. */
/* The base of the producer's RecordFuture (client/producer.py subclasses it with the
 * methods): a batch and a record's index in it, made in C by RecordAccumulator.append so that a
 * send costs no Python __init__. */
typedef struct {
    PyObject_HEAD
    PyObject *batch;
    Py_ssize_t index;
} FutureBaseObject;

static PyObject *FutureBase_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"batch", "index", NULL};
    PyObject *batch;
    Py_ssize_t index;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On:FutureBase", kwlist, &batch, &index))
        return NULL;
    FutureBaseObject *self = (FutureBaseObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(batch);
    self->batch = batch;
    self->index = index;
    return (PyObject *)self;
}

static int FutureBase_traverse(FutureBaseObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->batch);
    return 0;
}

static int FutureBase_clear(FutureBaseObject *self)
{
    Py_CLEAR(self->batch);
    return 0;
}

static void FutureBase_dealloc(FutureBaseObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    FutureBase_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMemberDef FutureBase_members[] = {
    {"_batch", T_OBJECT, offsetof(FutureBaseObject, batch), READONLY, "the record's batch"},
    {"_index", T_PYSSIZET, offsetof(FutureBaseObject, index), READONLY,
     "the record's index in its batch"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot FutureBase_slots[] = {
    {Py_tp_new, (void *)FutureBase_new},
    {Py_tp_dealloc, (void *)FutureBase_dealloc},
    {Py_tp_traverse, (void *)FutureBase_traverse},
    {Py_tp_clear, (void *)FutureBase_clear},
    {Py_tp_members, (void *)FutureBase_members},
    {Py_tp_doc, (void *)"FutureBase(batch, index)\n--\n\nA record's batch and index in it."},
    {0, NULL},
};

static PyType_Spec FutureBase_spec = {
    .name = "shmbroker._native.FutureBase",
    .basicsize = sizeof(FutureBaseObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = FutureBase_slots,
};

typedef struct {
    PyObject_HEAD
    shmb_acc acc;
    Py_ssize_t last_record_bytes;
    /* The send fast path (Producer.send): */
    PyObject *batch;            /* what the futures of the records held point to */
    PyTypeObject *future_type;  /* NULL: append returns indexes (tests, tools) */
    Py_buffer ring;             /* bound ring region (ring.obj NULL: none): is it idle? */
    int64_t linger_ns;
    int64_t first_ns;           /* CLOCK_MONOTONIC of the first record held */
    int32_t records_max;        /* a batch is due once it holds this many */
    int write_due;              /* the last append says: write the batch now */
    /* Sparse sends (Producer docs, "When a batch is written"): a batch's first record is
     * also due while frames are in flight, when the record before it was appended at least
     * gap_ns earlier and fewer than inflight_max frames are unacknowledged (0: only an idle
     * ring). */
    int64_t sparse_gap_ns;
    int64_t last_append_ns;     /* CLOCK_REALTIME of the last append (0: none) */
    int32_t inflight_max;
} AccumulatorObject;

static PyObject *Accumulator_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"records_bytes_max", "future_type", "linger_ms", "records_max",
                             "sparse_gap_us", "inflight_max", "records_bytes_target", NULL};
    Py_ssize_t max, target = 0;
    PyObject *future_type = Py_None;
    double linger_ms = 0, sparse_gap_us = 0;
    int records_max = INT32_MAX, inflight_max = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|Odidin:RecordAccumulator", kwlist, &max,
                                     &future_type, &linger_ms, &records_max, &sparse_gap_us,
                                     &inflight_max, &target))
        return NULL;
    if (!(sparse_gap_us >= 0 && sparse_gap_us <= 1e9) || inflight_max < 0)
        return PyErr_Format(PyExc_ValueError, "RecordAccumulator: sparse_gap_us must be in "
                            "[0, 1e9] and inflight_max >= 0");
    PyTypeObject *base = get_state(PyType_GetModule(type))->future_base_type;
    if (future_type != Py_None &&
        (!PyType_Check(future_type) ||
         !PyType_IsSubtype((PyTypeObject *)future_type, base)))
        return PyErr_Format(PyExc_TypeError,
                            "RecordAccumulator: future_type must be a subclass of FutureBase");
    if (linger_ms < 0 || linger_ms > 1e9 || records_max < 1)
        return PyErr_Format(PyExc_ValueError,
                            "RecordAccumulator: linger_ms must be in [0, 1e9], records_max >= 1");
    if (max <= 0 || max > INT32_MAX)
        return PyErr_Format(PyExc_ValueError,
                            "RecordAccumulator: records_bytes_max must be in [1, 2**31-1], got %zd",
                            max);
    if (target < 0 || target > max)
        return PyErr_Format(PyExc_ValueError,
                            "RecordAccumulator: records_bytes_target must be in [1, "
                            "records_bytes_max] (0: records_bytes_max), got %zd", target);
    AccumulatorObject *self = (AccumulatorObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    shmb_acc_init(&self->acc, (size_t)max);
    if (target > 0)
        shmb_acc_set_target(&self->acc, (size_t)target);
    self->batch = Py_None;
    Py_INCREF(Py_None);
    if (future_type != Py_None) {
        Py_INCREF(future_type);
        self->future_type = (PyTypeObject *)future_type;
    }
    self->ring.obj = NULL;
    self->linger_ns = (int64_t)(linger_ms * 1e6);
    self->records_max = records_max;
    self->sparse_gap_ns = (int64_t)(sparse_gap_us * 1e3);
    self->inflight_max = inflight_max;
    return (PyObject *)self;
}

static int Accumulator_traverse(AccumulatorObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->batch);
    Py_VISIT(self->future_type);
    return 0;
}

static int Accumulator_clear_refs(AccumulatorObject *self)
{
    Py_CLEAR(self->batch);
    Py_CLEAR(self->future_type);
    if (self->ring.obj != NULL)
        PyBuffer_Release(&self->ring);
    return 0;
}

static void Accumulator_dealloc(AccumulatorObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Accumulator_clear_refs(self);
    shmb_acc_free(&self->acc);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A sparse send's first record is due though a frame is in flight: waiting for the ring to
 * go idle would add the partition's round (and the sender thread's quiet wait) to its
 * latency (on a round trip, all of it), while batching behind the in-flight frame gains
 * nothing when sends are this far apart. Dense sends (the record before came less than
 * sparse_gap_ns earlier) still batch behind it; so do sends to a ring with inflight_max
 * frames unacknowledged (Kafka's max.in.flight.requests.per.connection) or filled to a
 * quarter. The gap is between appends, not since the last write: a record the sender thread
 * wrote late must not make the next sparse send look dense (it did, in a chain). */
static int acc_sparse_due(AccumulatorObject *self, const uint8_t *rb, uint64_t rpos,
                          uint64_t wpos, int64_t gap_ns)
{
    uint64_t capacity = shmb_u64_load_relaxed(rb + SHMB_RING_CAPACITY_OFFSET);
    uint64_t next = shmb_u64_load_relaxed(rb + SHMB_RING_NEXT_SEQUENCE_OFFSET);
    uint64_t acked = shmb_u64_load_acquire(rb + SHMB_RING_ACKED_SEQUENCE_OFFSET);
    if (next - acked >= (uint64_t)self->inflight_max || wpos - rpos >= capacity / 4)
        return 0;
    return gap_ns >= self->sparse_gap_ns;
}

/* A bytes-like object or None as a slice over a view the caller releases (view->obj NULL when
 * nothing is held). */
static int acc_slice(PyObject *o, shmb_slice *s, Py_buffer *view, const char *what)
{
    view->obj = NULL;
    if (o == Py_None) {
        s->data = NULL;
        s->length = -1;
        return 0;
    }
    if (PyBytes_CheckExact(o)) {
        s->data = (const uint8_t *)PyBytes_AS_STRING(o);
        s->length = PyBytes_GET_SIZE(o);
        return 0;
    }
    if (!PyObject_CheckBuffer(o) || PyObject_GetBuffer(o, view, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        view->obj = NULL;
        PyErr_Format(PyExc_TypeError, "%s must be bytes-like or None, got %.100s", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    s->data = view->buf;
    s->length = view->len;
    return 0;
}

static inline void release_view(Py_buffer *v)
{
    if (v->obj != NULL)
        PyBuffer_Release(v);
}

/* Headers, a sequence of (key, value) pairs: keys as UTF-8 of str(key), values bytes-like or
 * None. Fills hs[0..*n) and keeps what the slices point into in `keep` (a list). */
static int acc_headers(PyObject *headers, PyObject *keep, shmb_header_slice **hs, size_t *n)
{
    PyObject *seq = PySequence_Fast(headers, "headers must be a sequence of (key, value) pairs");
    if (seq == NULL)
        return -1;
    int rc = PyList_Append(keep, seq);
    Py_DECREF(seq);
    if (rc < 0)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    *hs = PyMem_Calloc((size_t)count + 1, sizeof **hs);
    if (*hs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *n = (size_t)count;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(pair) && !PyList_Check(pair)) {
            PyErr_Format(PyExc_TypeError, "headers[%zd] must be a (key, value) pair, got %.100s",
                         i, Py_TYPE(pair)->tp_name);
            return -1;
        }
        if (PySequence_Fast_GET_SIZE(pair) != 2) {
            PyErr_Format(PyExc_TypeError, "headers[%zd] must be a (key, value) pair", i);
            return -1;
        }
        PyObject *k = PySequence_Fast_GET_ITEM(pair, 0), *v = PySequence_Fast_GET_ITEM(pair, 1);
        PyObject *ks = PyUnicode_Check(k) ? (Py_INCREF(k), k) : PyObject_Str(k);
        if (ks == NULL)
            return -1;
        rc = PyList_Append(keep, ks);
        Py_DECREF(ks);
        if (rc < 0)
            return -1;
        Py_ssize_t klen;
        const char *kb = PyUnicode_AsUTF8AndSize(ks, &klen);
        if (kb == NULL)
            return -1;
        (*hs)[i].key.data = (const uint8_t *)kb;
        (*hs)[i].key.length = klen;
        if (v == Py_None) {
            (*hs)[i].value.data = NULL;
            (*hs)[i].value.length = -1;
        } else {
            /* bytes(v): a copy the list keeps alive (headers are the slow path) */
            if (!PyBytes_CheckExact(v)) {
                if (!PyObject_CheckBuffer(v)) {
                    PyErr_Format(PyExc_TypeError,
                                 "header value must be bytes-like or None, got %.100s",
                                 Py_TYPE(v)->tp_name);
                    return -1;
                }
                v = PyBytes_FromObject(v);
                if (v == NULL)
                    return -1;
            } else {
                Py_INCREF(v);
            }
            rc = PyList_Append(keep, v);
            Py_DECREF(v);
            if (rc < 0)
                return -1;
            (*hs)[i].value.data = (const uint8_t *)PyBytes_AS_STRING(v);
            (*hs)[i].value.length = PyBytes_GET_SIZE(v);
        }
    }
    return 0;
}

static int64_t wall_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* append(value, key=None, headers=None, timestamp=None) -> index >= 0, -1 (full: write the
 * batch, then append again) or -2 (too large for any batch; size in last_record_bytes). */
static PyObject *Accumulator_append(AccumulatorObject *self, PyObject *const *args,
                                    Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 4)
        return PyErr_Format(PyExc_TypeError, "append() takes 1 to 4 arguments (%zd given)", nargs);
    PyObject *key = nargs > 1 ? args[1] : Py_None;
    PyObject *headers = nargs > 2 ? args[2] : Py_None;
    PyObject *ts_obj = nargs > 3 ? args[3] : Py_None;
    int64_t ts, now_ns = 0;
    if (ts_obj == Py_None) {
        now_ns = wall_clock_ns(); /* one clock read: the timestamp and the sparse-send gap */
        ts = now_ns / 1000000;
    } else {
        if (!PyLong_Check(ts_obj) || PyBool_Check(ts_obj))
            return PyErr_Format(PyExc_TypeError, "timestamp must be an int (ms), got %R", ts_obj);
        int overflow = 0;
        long long t = PyLong_AsLongLongAndOverflow(ts_obj, &overflow);
        if (overflow || (t == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return PyErr_Format(PyExc_ValueError, "timestamp %R is outside int64", ts_obj);
        }
        if (t < 0) /* as Kafka's producer: CreateTime is ms since the epoch (-1 is "none") */
            return PyErr_Format(PyExc_ValueError, "timestamp %lld: must be >= 0 (ms since the "
                                "epoch) or None", t);
        ts = t;
    }
    shmb_slice k, v;
    Py_buffer kv, vv;
    if (acc_slice(args[0], &v, &vv, "value") < 0)
        return NULL;
    if (acc_slice(key, &k, &kv, "key") < 0) {
        release_view(&vv);
        return NULL;
    }
    PyObject *keep = NULL;
    shmb_header_slice *hs = NULL;
    size_t nh = 0;
    PyObject *result = NULL;
    if (headers != Py_None) {
        keep = PyList_New(0);
        if (keep == NULL || acc_headers(headers, keep, &hs, &nh) < 0)
            goto done;
    }
    size_t size = 0;
    const shmb_acc before = self->acc; /* to take the record back if its future fails */
    int r = shmb_acc_append(&self->acc, ts, k, v, hs, nh, &size);
    self->last_record_bytes = (Py_ssize_t)size;
    switch (r) {
    case SHMB_ACC_OK: {
        int32_t count = self->acc.count;
        if (count == 1 && self->linger_ns > 0)
            self->first_ns = monotonic_ns();
        int64_t gap_ns = 0;
        if (self->inflight_max > 0) {
            if (now_ns == 0)
                now_ns = wall_clock_ns();
            gap_ns = now_ns - self->last_append_ns; /* a clock stepped back: dense, harmless */
            self->last_append_ns = now_ns;
        }
        int due = count >= self->records_max;
        if (!due && self->ring.obj != NULL) {
            /* Idle: the partition took everything written (we are the ring's only writer). */
            const uint8_t *rb = self->ring.buf;
            uint64_t rpos = shmb_u64_load_acquire(rb + SHMB_RING_READ_POSITION_OFFSET);
            uint64_t wpos = shmb_u64_load_relaxed(rb + SHMB_RING_WRITE_POSITION_OFFSET);
            due = rpos == wpos;
            if (!due && count == 1 && self->inflight_max > 0)
                due = acc_sparse_due(self, rb, rpos, wpos, gap_ns);
            if (due && self->linger_ns > 0)
                due = monotonic_ns() - self->first_ns >= self->linger_ns;
        }
        self->write_due = due;
        if (self->future_type == NULL) {
            result = PyLong_FromLong(count - 1);
        } else {
            FutureBaseObject *f =
                (FutureBaseObject *)self->future_type->tp_alloc(self->future_type, 0);
            if (f != NULL) {
                Py_INCREF(self->batch);
                f->batch = self->batch;
                f->index = count - 1;
            } else { /* no future, no record (the buffer may have moved: keep its new place) */
                self->acc.len = before.len;
                self->acc.count = before.count;
                self->acc.base_timestamp = before.base_timestamp;
                self->acc.max_timestamp = before.max_timestamp;
                self->write_due = 0;
            }
            result = (PyObject *)f;
        }
        break;
    }
    case SHMB_ACC_FULL:
        result = self->future_type ? (Py_INCREF(Py_None), Py_None) : PyLong_FromLong(-1);
        break;
    case SHMB_ACC_TOO_LARGE:
        result = self->future_type ? (Py_INCREF(Py_None), Py_None) : PyLong_FromLong(-2);
        break;
    case SHMB_ACC_BAD_TIMESTAMP:
        PyErr_Format(PyExc_ValueError, "timestamp %lld: its delta from the batch's first "
                     "timestamp (%lld) overflows int64", (long long)ts,
                     (long long)self->acc.base_timestamp);
        break;
    default:
        PyErr_NoMemory();
    }
done:
    PyMem_Free(hs);
    Py_XDECREF(keep);
    release_view(&kv);
    release_view(&vv);
    return result;
}

static int acc_producer_args(PyObject *const *args, long long *pid, int *epoch, long *seq)
{
    *pid = PyLong_AsLongLong(args[0]);
    if (*pid == -1 && PyErr_Occurred())
        return -1;
    long e = PyLong_AsLong(args[1]);
    if (e == -1 && PyErr_Occurred())
        return -1;
    long s = PyLong_AsLong(args[2]);
    if (s == -1 && PyErr_Occurred())
        return -1;
    if (e < INT16_MIN || e > INT16_MAX || s < INT32_MIN || s > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "producer_epoch must fit int16, base_sequence int32");
        return -1;
    }
    *epoch = (int)e;
    *seq = s;
    return 0;
}

/* encode(producer_id, producer_epoch, base_sequence) -> the batch as bytes; then empty. */
static PyObject *Accumulator_encode(AccumulatorObject *self, PyObject *const *args,
                                    Py_ssize_t nargs)
{
    long long pid;
    int epoch;
    long seq;
    if (nargs != 3)
        return PyErr_Format(PyExc_TypeError, "encode() takes 3 arguments (%zd given)", nargs);
    if (acc_producer_args(args, &pid, &epoch, &seq) < 0)
        return NULL;
    if (self->acc.count == 0) {
        PyErr_SetString(PyExc_ValueError, "encode: the accumulator holds no records");
        return NULL;
    }
    size_t size = shmb_acc_seal(&self->acc, pid, (int16_t)epoch, (int32_t)seq);
    PyObject *out = PyBytes_FromStringAndSize((const char *)self->acc.buf, (Py_ssize_t)size);
    if (out != NULL) {
        shmb_acc_clear(&self->acc);
        self->write_due = 0;
    }
    return out;
}

/* Frames unacknowledged in a ring from which the producer's commit wakes a dozing partition
 * (half the sparse sends' in-flight bound, PRODUCER_MAX_IN_FLIGHT_MAX): a producer sending
 * faster than a doze is long would otherwise reach that bound within one doze and hold its
 * records for the sender thread (p99 ~0.85 ms in spin mode with a bound of 32). A spinning
 * ping-pong sends ~100 frames a millisecond: at 16 (bound 32) each partition was woken
 * every ~16 frames, and each such round stalled a spinning client (fourteenth session); 128
 * until the sixteenth, when the bound became 1024 (config.PRODUCER_MAX_IN_FLIGHT_MAX). */
#define ACC_DOZE_WAKE_FRAMES 512

/* The doorbell after a commit: the plain ring, or the urgent one (a dozing partition too)
 * once ACC_DOZE_WAKE_FRAMES frames wait for their acks. */
static void acc_doorbell(void *ring, uint8_t *control)
{
    const uint8_t *rb = ring;
    uint64_t next = shmb_u64_load_relaxed(rb + SHMB_RING_NEXT_SEQUENCE_OFFSET);
    uint64_t acked = shmb_u64_load_acquire(rb + SHMB_RING_ACKED_SEQUENCE_OFFSET);
    if (next - acked >= ACC_DOZE_WAKE_FRAMES)
        shmb_ctl_doorbell_ring_urgent(control);
    else
        shmb_ctl_doorbell_ring(control);
}

/* write_ring(ring, doorbell, producer_id, producer_epoch, base_sequence) ->
 * (status, sequence, write_position): the batch as one frame of the ring, the partition's
 * doorbell rung; on RING_OK the accumulator is empty, on RING_FULL unchanged. */
/* Seals the accumulator's records into one frame, copies it into the ring `ring` and rings
 * the doorbell of `control` (NULL: none); without the GIL for a large batch (the accumulator
 * is ours: the caller holds the Producer's lock). On SHMB_RING_OK the accumulator is cleared.
 * Returns the ring's status; *first_seq, *wpos (the write position after) and *len are set.
 * Used by Accumulator.write_ring and by the send path's write (sendpath_write). */
static int acc_write_frame(AccumulatorObject *self, void *ring, size_t ring_len,
                           uint8_t *control, long long pid, int epoch, long seq,
                           uint64_t *first_seq, uint64_t *wpos, size_t *len, shmb_ring_error *err)
{
    shmb_ring_payload payload;
    payload.len = shmb_acc_seal(&self->acc, pid, (int16_t)epoch, (int32_t)seq);
    payload.data = self->acc.buf;
    size_t written;
    int64_t first_offset;
    int r;
    if (payload.len >= GIL_RELEASE_BYTES_MIN) {
        Py_BEGIN_ALLOW_THREADS
        r = shmb_ring_write(ring, ring_len, control, &payload, 1, &written, first_seq,
                            &first_offset, err);
        if (written > 0 && control != NULL)
            acc_doorbell(ring, control);
        Py_END_ALLOW_THREADS
    } else {
        r = shmb_ring_write(ring, ring_len, control, &payload, 1, &written, first_seq,
                            &first_offset, err);
        if (written > 0 && control != NULL)
            acc_doorbell(ring, control);
    }
    *wpos = shmb_u64_load_relaxed((uint8_t *)ring + SHMB_RING_WRITE_POSITION_OFFSET);
    *len = payload.len;
    if (r == SHMB_RING_OK) {
        shmb_acc_clear(&self->acc);
        self->write_due = 0;
    }
    return r;
}

static PyObject *Accumulator_write_ring(AccumulatorObject *self, PyObject *const *args,
                                        Py_ssize_t nargs)
{
    long long pid;
    int epoch;
    long seq;
    if (nargs != 5)
        return PyErr_Format(PyExc_TypeError, "write_ring() takes 5 arguments (%zd given)", nargs);
    if (acc_producer_args(args + 2, &pid, &epoch, &seq) < 0)
        return NULL;
    if (self->acc.count == 0) {
        PyErr_SetString(PyExc_ValueError, "write_ring: the accumulator holds no records");
        return NULL;
    }
    PyObject *module = PyType_GetModule(Py_TYPE(self));
    Py_buffer rv, dv = {0};
    if (region_view(args[0], 1, &rv, "write_ring") < 0)
        return NULL;
    if (args[1] != Py_None) {
        if (region_view(args[1], 1, &dv, "write_ring doorbell") < 0) {
            PyBuffer_Release(&rv);
            return NULL;
        }
        if (dv.len < SHMB_CONTROL_REGISTRY_OFFSET) {
            PyErr_SetString(PyExc_ValueError, "write_ring: doorbell is not a control region");
            PyBuffer_Release(&dv);
            PyBuffer_Release(&rv);
            return NULL;
        }
    }
    uint64_t first_seq, wpos;
    size_t len;
    shmb_ring_error err;
    int r = acc_write_frame(self, rv.buf, (size_t)rv.len, dv.buf, pid, epoch, seq, &first_seq,
                            &wpos, &len, &err);
    PyObject *result = NULL;
    if (r == SHMB_RING_CORRUPT) {
        raise_ring_corrupt(get_state(module), &err);
    } else if (r == SHMB_RING_TOO_LARGE) {
        PyErr_Format(get_state(module)->errors[SHMB_RB_SCAN_TOO_LARGE],
                     "a batch of %zu bytes is larger than this ring can ever hold", len);
    } else {
        result = Py_BuildValue("(iKK)", r, (unsigned long long)first_seq,
                               (unsigned long long)wpos);
    }
    if (dv.buf != NULL)
        PyBuffer_Release(&dv);
    PyBuffer_Release(&rv);
    return result;
}

static PyObject *Accumulator_clear(AccumulatorObject *self, PyObject *Py_UNUSED(ignored))
{
    shmb_acc_clear(&self->acc);
    self->write_due = 0;
    Py_RETURN_NONE;
}

/* bind(ring): append then tells whether the ring is idle (write_due). The ring cannot be
 * unmapped while bound (its mmap refuses to close with a view exported): unbind() first. */
static PyObject *Accumulator_bind(AccumulatorObject *self, PyObject *ring)
{
    Py_buffer v;
    if (region_view(ring, 0, &v, "bind") < 0)
        return NULL;
    if (v.len < SHMB_RING_DATA_OFFSET) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "bind: not a ring region");
        return NULL;
    }
    if (self->ring.obj != NULL)
        PyBuffer_Release(&self->ring);
    self->ring = v;
    Py_RETURN_NONE;
}

static PyObject *Accumulator_unbind(AccumulatorObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->ring.obj != NULL)
        PyBuffer_Release(&self->ring);
    self->ring.obj = NULL;
    Py_RETURN_NONE;
}

static PyObject *Accumulator_get_batch(AccumulatorObject *self, void *Py_UNUSED(closure))
{
    Py_INCREF(self->batch);
    return self->batch;
}

static int Accumulator_set_batch(AccumulatorObject *self, PyObject *value,
                                 void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "batch cannot be deleted");
        return -1;
    }
    Py_INCREF(value);
    Py_SETREF(self->batch, value);
    return 0;
}

static PyObject *Accumulator_get_write_due(AccumulatorObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->write_due);
}

static PyObject *Accumulator_get_first_ms(AccumulatorObject *self, void *Py_UNUSED(closure))
{
    return PyFloat_FromDouble((double)self->first_ns / 1e6);
}

static PyObject *Accumulator_get_count(AccumulatorObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->acc.count);
}

static PyObject *Accumulator_get_nbytes(AccumulatorObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(self->acc.len - SHMB_RB_HEADER_SIZE);
}

static PyObject *Accumulator_get_last_record_bytes(AccumulatorObject *self,
                                                   void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->last_record_bytes);
}

static PyObject *Accumulator_get_records_bytes_max(AccumulatorObject *self,
                                                   void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(self->acc.records_bytes_max);
}

static PyObject *Accumulator_get_records_bytes_target(AccumulatorObject *self,
                                                      void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(self->acc.records_bytes_target);
}

static PyMethodDef Accumulator_methods[] = {
    {"append", (PyCFunction)(void (*)(void))Accumulator_append, METH_FASTCALL,
     "append(value, key=None, headers=None, timestamp=None) -> index, -1 (full) or -2 (too "
     "large); positional only; timestamp None: now (CreateTime)"},
    {"encode", (PyCFunction)(void (*)(void))Accumulator_encode, METH_FASTCALL,
     "encode(producer_id, producer_epoch, base_sequence) -> bytes of the batch; then empty"},
    {"write_ring", (PyCFunction)(void (*)(void))Accumulator_write_ring, METH_FASTCALL,
     "write_ring(ring, doorbell, producer_id, producer_epoch, base_sequence) -> (status, "
     "sequence, write_position); empty after RING_OK"},
    {"clear", (PyCFunction)Accumulator_clear, METH_NOARGS, "clear(): forget the records"},
    {"bind", (PyCFunction)Accumulator_bind, METH_O,
     "bind(ring): append reports in write_due whether the ring is idle; unbind() before the "
     "ring is unmapped"},
    {"unbind", (PyCFunction)Accumulator_unbind, METH_NOARGS, "unbind(): forget the ring"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Accumulator_getset[] = {
    {"count", (getter)Accumulator_get_count, NULL, "records held", NULL},
    {"nbytes", (getter)Accumulator_get_nbytes, NULL, "bytes of the records held (no header)",
     NULL},
    {"last_record_bytes", (getter)Accumulator_get_last_record_bytes, NULL,
     "encoded size of the record the last append was given", NULL},
    {"records_bytes_max", (getter)Accumulator_get_records_bytes_max, NULL,
     "most bytes of records one batch holds (a record larger is too large)", NULL},
    {"records_bytes_target", (getter)Accumulator_get_records_bytes_target, NULL,
     "a batch is full past this many bytes of records (batch.size); an empty batch takes a "
     "larger record alone", NULL},
    {"batch", (getter)Accumulator_get_batch, (setter)Accumulator_set_batch,
     "the object the futures of the records held point to", NULL},
    {"write_due", (getter)Accumulator_get_write_due, NULL,
     "after append: the batch should be written now (records_max reached, or the bound ring "
     "is idle and linger_ms has passed since the first record)", NULL},
    {"first_ms", (getter)Accumulator_get_first_ms, NULL,
     "time.monotonic() * 1000 of the first record held (with linger_ms only)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Accumulator_slots[] = {
    {Py_tp_new, (void *)Accumulator_new},
    {Py_tp_dealloc, (void *)Accumulator_dealloc},
    {Py_tp_traverse, (void *)Accumulator_traverse},
    {Py_tp_clear, (void *)Accumulator_clear_refs},
    {Py_tp_methods, (void *)Accumulator_methods},
    {Py_tp_getset, (void *)Accumulator_getset},
    {Py_tp_doc, (void *)"RecordAccumulator(records_bytes_max, future_type=None, linger_ms=0, "
                        "records_max=2**31-1, sparse_gap_us=0, inflight_max=0, "
                        "records_bytes_target=0)\n--\n\n"
                        "One RecordBatch v2 under construction, encoded record by record "
                        "(shmb/accumulator.h: the target is batch.size, 0 = the max)."},
    {0, NULL},
};

static PyType_Spec Accumulator_spec = {
    .name = "shmbroker._native.RecordAccumulator",
    .basicsize = sizeof(AccumulatorObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = Accumulator_slots,
};

/* ==== Mutex: the producer's lock, one word the C send path can CAS ============================
 *
 * Behaves as threading.Lock for the calls Producer and threading.Condition make: acquire
 * (blocking, timeout), release, locked, the context manager. The word and why: shmb/mutex.h.
 * A blocking acquire sleeps without the GIL (the holder may need it to get to its release)
 * and runs signal handlers when a signal interrupts it, as threading.Lock does. */

typedef struct {
    PyObject_HEAD
    uint32_t word;
} MutexObject;

/* Takes the mutex, sleeping (GIL released) up to timeout_s (< 0: no limit): 1 taken, 0 timed
 * out, -1 an exception (a signal handler raised). */
static int mutex_lock_blocking(MutexObject *self, double timeout_s)
{
    if (shmb_mutex_trylock(&self->word))
        return 1;
    int64_t deadline = timeout_s < 0 ? -1 : shmb_monotonic_ns() + (int64_t)(timeout_s * 1e9);
    for (int r;;) {  /* bounded by the deadline; each pass ends in a sleep or a signal */
        Py_BEGIN_ALLOW_THREADS
        r = shmb_mutex_lock(&self->word, deadline);
        Py_END_ALLOW_THREADS
        if (r == SHMB_MUTEX_TAKEN)
            return 1;
        if (r == SHMB_MUTEX_TIMEOUT)
            return 0;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

static PyObject *Mutex_acquire(MutexObject *self, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *blocking_o = NULL, *timeout_o = NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs > 2)
        return PyErr_Format(PyExc_TypeError, "acquire() takes at most 2 arguments (%zd given)",
                            nargs + nkw);
    if (nargs > 0)
        blocking_o = args[0];
    if (nargs > 1)
        timeout_o = args[1];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        PyObject **slot = PyUnicode_CompareWithASCIIString(name, "blocking") == 0 ? &blocking_o
                        : PyUnicode_CompareWithASCIIString(name, "timeout") == 0 ? &timeout_o
                                                                                : NULL;
        if (slot == NULL || *slot != NULL)
            return PyErr_Format(PyExc_TypeError, "acquire() got an unexpected or repeated "
                                "keyword argument '%U'", name);
        *slot = args[nargs + i];
    }
    int blocking = 1;
    if (blocking_o != NULL && (blocking = PyObject_IsTrue(blocking_o)) < 0)
        return NULL;
    double timeout = -1.0;
    if (timeout_o != NULL && (timeout = PyFloat_AsDouble(timeout_o)) == -1.0 && PyErr_Occurred())
        return NULL;
    if (!blocking && timeout != -1.0)
        return PyErr_Format(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
    if (timeout < 0 && timeout != -1.0)
        return PyErr_Format(PyExc_ValueError, "timeout value must be a non-negative number");
    if (shmb_mutex_trylock(&self->word))
        Py_RETURN_TRUE;
    if (!blocking)
        Py_RETURN_FALSE;
    int r = mutex_lock_blocking(self, timeout);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

/* 0, or -1 with RuntimeError if it was not held (as threading.Lock). */
static int mutex_unlock_checked(MutexObject *self)
{
    if (__atomic_load_n(&self->word, __ATOMIC_RELAXED) == SHMB_MUTEX_UNLOCKED) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return -1;
    }
    shmb_mutex_unlock(&self->word);
    return 0;
}

static PyObject *Mutex_release(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    if (mutex_unlock_checked(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Mutex_enter(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    int r = mutex_lock_blocking(self, -1.0);
    if (r < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *Mutex_exit(MutexObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (mutex_unlock_checked(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Mutex_locked(MutexObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(__atomic_load_n(&self->word, __ATOMIC_RELAXED) != SHMB_MUTEX_UNLOCKED);
}

static PyObject *Mutex_repr(MutexObject *self)
{
    return PyUnicode_FromFormat("<_native.Mutex %s at %p>",
                                self->word == SHMB_MUTEX_UNLOCKED ? "unlocked" : "locked", self);
}

static void Mutex_dealloc(MutexObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef Mutex_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))Mutex_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool, as threading.Lock.acquire"},
    {"release", (PyCFunction)Mutex_release, METH_NOARGS, "release(); RuntimeError if not held"},
    {"locked", (PyCFunction)Mutex_locked, METH_NOARGS, "whether it is held"},
    {"__enter__", (PyCFunction)Mutex_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Mutex_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Mutex_slots[] = {
    {Py_tp_new, (void *)PyType_GenericNew},
    {Py_tp_dealloc, (void *)Mutex_dealloc},
    {Py_tp_repr, (void *)Mutex_repr},
    {Py_tp_methods, Mutex_methods},
    {Py_tp_doc, (void *)"A lock as threading.Lock whose state is one word the C send path takes "
                        "with a compare-and-swap (native/include/shmb/mutex.h)."},
    {0, NULL},
};

static PyType_Spec Mutex_spec = {
    .name = "shmbroker._native.Mutex",
    .basicsize = sizeof(MutexObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Mutex_slots,
};

/* ==== _Batch slots: the producer's batch objects read and written at their __slots__ offsets
 * (as their member descriptors do), by SendPath's write and by resolve_inflight. */

/* The offset of the __slots__ member `name` of `type`; -1 with TypeError if it is not one. */
static int batch_slot_offset(PyObject *type, const char *name, Py_ssize_t *offset)
{
    PyObject *d = PyObject_GetAttrString(type, name);
    if (d == NULL)
        return -1;
    int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) &&
             ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
    *offset = ok ? ((PyMemberDescrObject *)d)->d_member->offset : 0;
    Py_DECREF(d);
    if (!ok)
        PyErr_Format(PyExc_TypeError, "%s.%s must be a __slots__ slot",
                     ((PyTypeObject *)type)->tp_name, name);
    return ok ? 0 : -1;
}

static inline PyObject **slot_at(PyObject *obj, Py_ssize_t offset)
{
    return (PyObject **)((char *)obj + offset);
}

/* The int in a batch's slot, or -2 (unset, not an int, or out of range). */
static inline long long batch_slot_int(PyObject *batch, Py_ssize_t offset)
{
    PyObject *v = *slot_at(batch, offset);
    if (v == NULL || !PyLong_CheckExact(v))
        return -2;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    return overflow || x < 0 ? -2 : x;
}

/* obj.<slot> = value, taking the reference (NULL: an error is set, nothing changes). */
static inline int slot_set(PyObject *obj, Py_ssize_t offset, PyObject *value)
{
    if (value == NULL)
        return -1;
    PyObject **slot = slot_at(obj, offset), *old = *slot;
    *slot = value;
    Py_XDECREF(old);
    return 0;
}

static const char *const batch_slot_names[B_NSLOTS] = {
    "producer", "topic", "partition", "count", "base_offset", "error", "done", "writer",
    "sequence", "deadline"};

/* The offsets of batch_type's slots; its __slots__ must be exactly batch_slot_names (so that
 * an object made by batch_new has every slot _Batch.__init__ sets). */
static int batch_slots_init(PyObject *batch_type, BatchSlots *s)
{
    PyObject *names = PyObject_GetAttrString(batch_type, "__slots__");
    if (names == NULL)
        return -1;
    int same = PyTuple_Check(names) && PyTuple_GET_SIZE(names) == B_NSLOTS;
    for (int i = 0; same && i < B_NSLOTS; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        same = PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, batch_slot_names[i]) == 0;
    }
    Py_DECREF(names);
    if (!same) {
        PyErr_Format(PyExc_TypeError, "%s.__slots__ must be the tuple (\"producer\", \"topic\", "
                     "...): the C producer path knows only those", ((PyTypeObject *)batch_type)->tp_name);
        return -1;
    }
    for (int i = 0; i < B_NSLOTS; i++) {
        if (batch_slot_offset(batch_type, batch_slot_names[i], &s->at[i]) < 0)
            return -1;
    }
    return 0;
}

/* batch_slots_init, looked up once per batch type (its 11 attribute lookups were a third
 * of a budgeted resolve_inflight's time in a spinning ping-pong: perf/RESULTS.md, sixteenth
 * session). Cached only while the type's version tag is valid and unchanged. */
static int batch_slots_cached(module_state *st, PyObject *batch_type, BatchSlots *s)
{
    PyTypeObject *t = (PyTypeObject *)batch_type;
    if (st->slots_type == batch_type && PyType_HasFeature(t, Py_TPFLAGS_VALID_VERSION_TAG) &&
        t->tp_version_tag == st->slots_tag) {
        *s = st->slots;
        return 0;
    }
    if (batch_slots_init(batch_type, s) < 0)
        return -1;
    Py_CLEAR(st->slots_type);
    if (PyType_HasFeature(t, Py_TPFLAGS_VALID_VERSION_TAG)) {
        Py_INCREF(batch_type);
        st->slots_type = batch_type;
        st->slots_tag = t->tp_version_tag;
        st->slots = *s;
    }
    return 0;
}

/* ==== poll_ring: Consumer.poll's common case in one call ====================================
 *
 * Why: a found poll spent ~1 us in the Python around ring_take (its checks, the deadline's
 * clock read, the counters gate, the bookkeeping): more than ring_take itself, twice per
 * round trip (perf/RESULTS.md, seventeenth session).
 *
 * What: for a consumer that Consumer.poll found open, unforked and without a group (it
 * passes the attributes this needs: Python loads an instance attribute ~10x faster than
 * PyObject_GetAttr), Consumer._poll's checks for its one-partition ring path (counters not
 * due, rings read, the _Fetch caught up), ring_take with the poll's first wait, then
 * Consumer._ring_outcome's common case (records from the position on, no more than asked).
 * _Fetch and RingReads are read through their slots' offsets. Returns
 *  - None: nothing was read and nothing waited for (a check failed, the ring registry moved
 *    on, the counters are due): the caller runs Consumer._poll, the reference;
 *  - a list: the records, handed out exactly as Consumer._poll would have;
 *  - a 7-tuple, ring_take's result and the CLOCK_MONOTONIC ns at which the poll's wait began
 *    (0: it did not wait): the ring was read, maybe after a wait, with an outcome the Python
 *    path handles; Consumer._poll goes on from it (it must: records may have been taken).
 * Arguments: (order, timeout_ms, max_records, read_rings, spin_ns, counting, counters_due,
 * counters_next_ns, records_max). */

static const char *const fetch_slot_names[F_NSLOTS] = {
    "rings", "pending", "position", "hw", "control", "topic", "partition", "seen_hw_seq",
    "pending_end", "records_out"};
static const char *const rings_slot_names[R_NSLOTS] = {
    "control", "_bufs", "_hints", "_froms", "_registry_seen"};
/* A type's slot offsets, looked up once (again when the type changes or its version tag
 * is no longer valid: any change to the class bumps it). 0; 1 when the type has no valid
 * version tag (not cached, not used: the Python path runs); -1 with an error set (not a
 * class with those slots). */
static int slots_cached(PyTypeObject *type, const char *const *names, int n, PyObject **cached,
                        unsigned int *tag, Py_ssize_t *at)
{
    if (*cached == (PyObject *)type && PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG) &&
        type->tp_version_tag == *tag)
        return 0;
    Py_ssize_t found[16]; /* the most slots a caller names */
    if (n > 16) {
        PyErr_SetString(PyExc_SystemError, "slots_cached: too many slots");
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (batch_slot_offset((PyObject *)type, names[i], &found[i]) < 0)
            return -1;
    Py_CLEAR(*cached);
    if (!PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG))
        return 1;
    *cached = Py_NewRef((PyObject *)type);
    *tag = type->tp_version_tag;
    memcpy(at, found, sizeof(Py_ssize_t) * (size_t)n);
    return 0;
}

/* A slot as a long long; *ok = 0 unless it is set to an int in range. */
static long long slot_ll(PyObject *obj, Py_ssize_t offset, int *ok)
{
    PyObject *v = *slot_at(obj, offset);
    if (v == NULL || !PyLong_CheckExact(v)) {
        *ok = 0;
        return 0;
    }
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        *ok = 0;
    }
    return x;
}

static PyObject *py_poll_ring(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9)
        return PyErr_Format(PyExc_TypeError, "poll_ring takes 9 arguments, got %zd", nargs);
    module_state *st = get_state(module);
    /* The Consumer's attributes, passed in (see above). */
    PyObject *order = args[0], *timeout = args[1];
    int ok = 1;
    long long max_records = PyLong_CheckExact(args[2]) ? PyLong_AsLongLong(args[2]) : -1;
    long long records_max = PyLong_CheckExact(args[8]) ? PyLong_AsLongLong(args[8]) : -1;
    long long spin_ns = PyLong_CheckExact(args[4]) ? PyLong_AsLongLong(args[4]) : -1;
    long long due = PyLong_CheckExact(args[6]) ? PyLong_AsLongLong(args[6]) : -1;
    if (PyErr_Occurred() || max_records < 1 || records_max < 1 || spin_ns < 0 || due < 0 ||
        args[3] != Py_True) {
        PyErr_Clear();
        Py_RETURN_NONE; /* the Python path (it raises for a bad max_records) */
    }
    int counting = PyObject_IsTrue(args[5]);
    if (counting < 0)
        return NULL;
    if (due) { /* the counters are published by the Python path once they are due */
        long long next = PyLong_CheckExact(args[7]) ? PyLong_AsLongLong(args[7]) : -1;
        if (PyErr_Occurred()) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        if (shmb_monotonic_ns() >= next)
            Py_RETURN_NONE;
    }
    /* The first wait, as Consumer._poll: ceil(timeout_ms) when > 0. */
    long long wait_ms;
    if (PyLong_CheckExact(timeout)) {
        int overflow;
        wait_ms = PyLong_AsLongLongAndOverflow(timeout, &overflow);
        if (overflow || (wait_ms == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
    } else if (PyFloat_CheckExact(timeout)) {
        double t = PyFloat_AS_DOUBLE(timeout);
        if (!(t < 1e15)) /* NaN, inf, huge: the Python path */
            Py_RETURN_NONE;
        wait_ms = t > 0 ? (long long)(t + 0.999) : 0;
    } else {
        Py_RETURN_NONE;
    }
    if (wait_ms < 0)
        wait_ms = 0;
    if (!PyList_CheckExact(order) || PyList_GET_SIZE(order) != 1)
        Py_RETURN_NONE;
    PyObject *fetch = PyList_GET_ITEM(order, 0);
    if (slots_cached(Py_TYPE(fetch), fetch_slot_names, F_NSLOTS, &st->fetch_type, &st->fetch_tag,
                     st->fetch_at) != 0) {
        PyErr_Clear(); /* not a _Fetch with those slots, or no version tag */
        Py_RETURN_NONE;
    }
    const Py_ssize_t *at = st->fetch_at;
    /* The fetch: rings attached, nothing pending, caught up, the same control region. */
    PyObject *rings = *slot_at(fetch, at[F_RINGS]);
    PyObject *pending = *slot_at(fetch, at[F_PENDING]);
    PyObject *fcontrol = *slot_at(fetch, at[F_CONTROL]);
    PyObject *topic = *slot_at(fetch, at[F_TOPIC]);
    if (rings == NULL || rings == Py_None || pending == NULL || !PyList_CheckExact(pending) ||
        PyList_GET_SIZE(pending) != 0 || fcontrol == NULL || topic == NULL)
        Py_RETURN_NONE;
    long long position = slot_ll(fetch, at[F_POSITION], &ok);
    long long hw = slot_ll(fetch, at[F_HW], &ok);
    long long partition = slot_ll(fetch, at[F_PARTITION], &ok);
    long long seen_hw = slot_ll(fetch, at[F_SEEN_HW_SEQ], &ok);
    if (!ok || !(position >= hw && hw >= 0))
        Py_RETURN_NONE;
    if (slots_cached(Py_TYPE(rings), rings_slot_names, R_NSLOTS, &st->rings_type, &st->rings_tag,
                     st->rings_at) != 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    const Py_ssize_t *rat = st->rings_at;
    PyObject *control = *slot_at(rings, rat[R_CONTROL]);
    PyObject *bufs = *slot_at(rings, rat[R_BUFS]);
    PyObject *hints = *slot_at(rings, rat[R_HINTS]);
    PyObject *froms = *slot_at(rings, rat[R_FROMS]);
    long long registry_seen = slot_ll(rings, rat[R_REGISTRY_SEEN], &ok);
    if (control != fcontrol || bufs == NULL || hints == NULL || froms == NULL || !ok)
        Py_RETURN_NONE;
    if (st->buf_name == NULL && (st->buf_name = PyUnicode_InternFromString("buf")) == NULL)
        return NULL;
    PyObject *buf = PyObject_GetAttr(control, st->buf_name);
    if (buf == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    /* Held across the wait (the GIL is released there): what ring_take_run uses after it. */
    Py_INCREF(fetch);
    Py_INCREF(bufs);
    Py_INCREF(hints);
    Py_INCREF(froms);
    Py_INCREF(topic);
    PyObject *result = NULL;
    int64_t started = wait_ms > 0 ? shmb_monotonic_ns() : 0;
    take_out o;
    if (ring_take_run(st, buf, bufs, hints, froms, position, registry_seen, records_max, topic,
                      partition, wait_ms, spin_ns, seen_hw, &o) < 0)
        goto done; /* an argument ring_take refuses: the Python path raises the same */
    if (o.status == RING_TAKE_DECLINED) { /* decided before any wait: nothing done */
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t count = o.records != NULL ? PyList_GET_SIZE(o.records) : 0;
    if (o.status == SHMB_FRAME_AT_FOUND && o.at == 0 && count > 0 && count <= max_records) {
        /* Consumer._ring_outcome's common case: pending_end, the position past the last
         * record (or the frames' end), the records handed out (the caller counts the poll). */
        long long last = ((RecordObject *)PyList_GET_ITEM(o.records, count - 1))->offset + 1;
        long long out = counting ? slot_ll(fetch, at[F_RECORDS_OUT], &ok) : 0;
        if (!ok || slot_set(fetch, at[F_PENDING_END], PyLong_FromLongLong(o.end)) < 0 ||
            slot_set(fetch, at[F_POSITION], PyLong_FromLongLong(o.end > last ? o.end : last)) < 0 ||
            (counting && slot_set(fetch, at[F_RECORDS_OUT], PyLong_FromLongLong(out + count)) < 0)) {
            Py_DECREF(o.records);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "poll_ring: records_out is not an int");
            goto done;
        }
        result = o.records;
        goto done;
    }
    PyObject *t = take_result(o.status, o.records, o.at, o.end, o.seen_commit, o.beyond);
    PyObject *s7 = t != NULL ? PyLong_FromLongLong(started) : NULL;
    if (s7 != NULL)
        result = PyTuple_Pack(7, PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1),
                              PyTuple_GET_ITEM(t, 2), PyTuple_GET_ITEM(t, 3),
                              PyTuple_GET_ITEM(t, 4), PyTuple_GET_ITEM(t, 5), s7);
    Py_XDECREF(s7);
    Py_XDECREF(t);
done:
    Py_DECREF(buf);
    Py_DECREF(fetch);
    Py_DECREF(bufs);
    Py_DECREF(hints);
    Py_DECREF(froms);
    Py_DECREF(topic);
    return result;
}

/* ==== SendPath: Producer.send without a Python frame ========================================
 *
 * Why: callgrind put ~4,300 instructions on each Producer.send, ~800 of them in the C append;
 * the rest was the Python frame (arguments, lock calls, the dict lookup of the accumulator,
 * attribute loads, the write_due test). The 1 -> 1 pipeline is bound by that CPU per record.
 *
 * How (chosen over an instance attribute holding a bound callable, which would make a
 * producer -> callable -> producer cycle and keep a dropped Producer, and its sender thread,
 * alive until the cyclic GC runs): the Producer keeps one SendPath (`_send_path`, no reference
 * back to the producer) that holds the producer's lock and the dicts `_accs` and `_sticky`
 * themselves (the same objects: `reset` is called whenever the producer makes new ones, at
 * start and after a fork). `Producer.send` is a SendMethod descriptor: `producer.send` is a
 * bound method of that SendPath, so a call is one vectorcall into sendpath_call.
 *
 * sendpath_call does, under the same lock and for the same span as the Python reference
 * (Producer._send_python), only the common cases: an int partition whose accumulator exists,
 * no key and no partition with the topic's sticky accumulator existing, or a bytes key and no
 * partition (murmur2 over the partition count the reference cached); the accumulator
 * takes the record. Everything else (a key, no accumulator yet, a full batch or a record too
 * large, unusual argument types or keywords) calls the reference, which then does all the
 * work as before; the fast path has changed nothing by then (a refused append adds nothing).
 * After an append that found the batch due or the sender not armed, it calls
 * Producer._after_append under the lock: the reference's own last lines. */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *acquire, *release;   /* the producer's lock's bound methods */
    MutexObject *mutex;            /* the same lock when it is a _native.Mutex (taken in C) */
    PyTypeObject *mutex_type;
    PyObject *accs, *sticky;       /* Producer._accs and Producer._sticky (dicts) */
    PyObject *counts;              /* Producer._partition_counts: topic -> (count, expiry) */
    PyTypeObject *acc_type;        /* client.producer._Accumulator */
    Py_ssize_t records_offset;     /* where its `records` slot is (a member descriptor) */
    PyTypeObject *records_type;    /* _native.RecordAccumulator */
    PyObject *slow;                /* Producer._send_python (the reference) */
    PyObject *after_append;        /* Producer._after_append(self, acc) */
    PyObject *names[6];            /* interned parameter names of send */
    int armed;                     /* Producer._sender_armed lives here */
    int enabled;                   /* 0: every call goes to the reference (tests) */
    /* The last (topic, partition) -> accumulator found in `accs`: a loop sending to one
     * partition skips building, hashing and freeing the key tuple (~450 of ~3,500
     * instructions per send). The topic is matched by identity (a caller passes the same
     * str object each time; another object equal to it just takes the dict path). Valid
     * while the entry is in `accs`: the producer calls forget() wherever it removes one
     * (_drop_writer, close) and reset() forgets too; entries are only added for absent keys. */
    PyObject *cached_topic;        /* strong reference, or NULL */
    long cached_partition;
    PyObject *cached_acc;          /* strong reference, or NULL */
    /* The write of a due batch (sendpath_write), set by configure(); batch_type NULL: off. */
    PyObject *batch_type;          /* client.producer._Batch */
    int acks;
    double delivery_timeout_s;
    Py_ssize_t reap_inflight;      /* _REAP_INFLIGHT: at that many the reference reaps */
    uint64_t reap_completions;     /* _REAP_COMPLETIONS: or at that many unread completions */
    Py_ssize_t reap_some_inflight; /* _REAP_SOME_INFLIGHT: from that many, a few when acked */
    PyObject *completion_type;     /* shm.ring.Completion; NULL: that reap is the reference's */
    Py_ssize_t reap_some_batches;  /* _REAP_SOME_BATCHES: the most one such reap resolves */
    PyObject *wnames[15];          /* interned attribute names, see sendpath_wnames */
    BatchSlots bslots;             /* batch_type's slot offsets (set with batch_type) */
    PyObject *inf;                 /* float("inf"): a new batch's deadline */
} SendPathObject;

enum { W_WRITER, W_TOPIC, W_PARTITION, W_CONTROL, W_BUF, W_NEXT_SEQUENCE,
       W_WRITTEN_POSITION, W_INFLIGHT, W_SEQUENCE, W_DEADLINE, W_COUNT, W_APPEND, W_RING,
       W_COMPLETIONS, W_COMPLETIONS_READ, W_NAMES };
static const char *const sendpath_wnames[W_NAMES] = {
    "writer", "topic", "partition", "control", "buf", "next_sequence",
    "written_position", "inflight", "sequence", "deadline", "count", "append", "ring",
    "_completions", "_completions_read"};
_Static_assert(W_NAMES == sizeof(((SendPathObject *)0)->wnames) / sizeof(PyObject *),
               "SendPathObject.wnames holds one name per W_ index");

static const char *const sendpath_names[6] = {"topic", "value", "key", "partition", "headers",
                                              "timestamp"};

static PyObject *sendpath_call(PyObject *op, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames);

static PyObject *SendPath_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"acc_type", "slow", "after_append", NULL};
    PyObject *acc_type, *slow, *after_append;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO:SendPath", kwlist, &PyType_Type,
                                     &acc_type, &slow, &after_append))
        return NULL;
    if (!PyCallable_Check(slow) || !PyCallable_Check(after_append))
        return PyErr_Format(PyExc_TypeError, "SendPath: slow and after_append must be callable");
    PyObject *d = PyObject_GetAttrString(acc_type, "records");
    if (d == NULL)
        return NULL;
    /* A __slots__ member: read it at its offset, as its descriptor does (type checked). */
    int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) &&
             ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
    Py_ssize_t offset = ok ? ((PyMemberDescrObject *)d)->d_member->offset : 0;
    Py_DECREF(d);
    if (!ok)
        return PyErr_Format(PyExc_TypeError, "SendPath: acc_type.records must be a __slots__ slot");
    SendPathObject *self = (SendPathObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = sendpath_call;
    Py_INCREF(acc_type);
    self->acc_type = (PyTypeObject *)acc_type;
    self->records_offset = offset;
    self->records_type = get_state(PyType_GetModule(type))->accumulator_type;
    Py_INCREF(self->records_type);
    self->mutex_type = get_state(PyType_GetModule(type))->mutex_type;
    Py_INCREF(self->mutex_type);
    Py_INCREF(slow);
    self->slow = slow;
    Py_INCREF(after_append);
    self->after_append = after_append;
    for (int i = 0; i < 6; i++) {
        self->names[i] = PyUnicode_InternFromString(sendpath_names[i]);
        if (self->names[i] == NULL) {
            Py_DECREF(self);
            return NULL;
        }
    }
    for (int i = 0; i < W_NAMES; i++) {
        self->wnames[i] = PyUnicode_InternFromString(sendpath_wnames[i]);
        if (self->wnames[i] == NULL) {
            Py_DECREF(self);
            return NULL;
        }
    }
    self->enabled = 1;
    return (PyObject *)self;
}

/* reset(lock, accs, sticky): the producer made a new lock and new dicts (start, fork). */
static PyObject *SendPath_reset(SendPathObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_CheckExact(args[1]) || !PyDict_CheckExact(args[2]) ||
        !PyDict_CheckExact(args[3]))
        return PyErr_Format(PyExc_TypeError,
                            "reset(lock, accs: dict, sticky: dict, partition_counts: dict)");
    PyObject *acquire = PyObject_GetAttrString(args[0], "acquire");
    if (acquire == NULL)
        return NULL;
    PyObject *release = PyObject_GetAttrString(args[0], "release");
    if (release == NULL) {
        Py_DECREF(acquire);
        return NULL;
    }
    Py_XSETREF(self->acquire, acquire);
    Py_XSETREF(self->release, release);
    if (Py_IS_TYPE(args[0], self->mutex_type)) {
        Py_INCREF(args[0]);
        Py_XSETREF(self->mutex, (MutexObject *)args[0]);
    } else {
        Py_CLEAR(self->mutex);
    }
    Py_INCREF(args[1]);
    Py_XSETREF(self->accs, args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(self->sticky, args[2]);
    Py_INCREF(args[3]);
    Py_XSETREF(self->counts, args[3]);
    self->armed = 0;
    Py_CLEAR(self->cached_topic);
    Py_CLEAR(self->cached_acc);
    Py_RETURN_NONE;
}

/* forget(): an accumulator left `accs`; drop the cached one. */
static PyObject *SendPath_forget(SendPathObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(self->cached_topic);
    Py_CLEAR(self->cached_acc);
    Py_RETURN_NONE;
}

static int SendPath_traverse(SendPathObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->acquire);
    Py_VISIT(self->release);
    Py_VISIT(self->mutex);
    Py_VISIT(self->mutex_type);
    Py_VISIT(self->accs);
    Py_VISIT(self->sticky);
    Py_VISIT(self->counts);
    Py_VISIT(self->acc_type);
    Py_VISIT(self->records_type);
    Py_VISIT(self->slow);
    Py_VISIT(self->after_append);
    Py_VISIT(self->cached_topic);
    Py_VISIT(self->cached_acc);
    Py_VISIT(self->batch_type);
    Py_VISIT(self->completion_type);
    return 0;
}

static int SendPath_clear(SendPathObject *self)
{
    Py_CLEAR(self->acquire);
    Py_CLEAR(self->release);
    Py_CLEAR(self->mutex);
    Py_CLEAR(self->mutex_type);
    Py_CLEAR(self->accs);
    Py_CLEAR(self->sticky);
    Py_CLEAR(self->counts);
    Py_CLEAR(self->acc_type);
    Py_CLEAR(self->records_type);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->after_append);
    Py_CLEAR(self->cached_topic);
    Py_CLEAR(self->cached_acc);
    Py_CLEAR(self->batch_type);
    Py_CLEAR(self->completion_type);
    Py_CLEAR(self->inf);
    for (int i = 0; i < 6; i++)
        Py_CLEAR(self->names[i]);
    for (int i = 0; i < W_NAMES; i++)
        Py_CLEAR(self->wnames[i]);
    return 0;
}

static void SendPath_dealloc(SendPathObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    SendPath_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* The reference does it all: slow(producer, *args, **kwargs), the call as it came. */
static PyObject *sendpath_slow(SendPathObject *self, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames)
{
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static inline int sendpath_unlock(SendPathObject *self)
{
    if (self->mutex != NULL)
        return mutex_unlock_checked(self->mutex);
    PyObject *r = PyObject_Vectorcall(self->release, NULL, 0, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* configure(batch_type, acks, delivery_timeout_ms, reap_inflight, reap_completions,
 * reap_some_inflight, completion_type, reap_some_batches): what sendpath_write needs of the
 * producer; batch_type None turns the C write off (every due batch goes to
 * Producer._after_append, the reference), completion_type None its reap of a few
 * acknowledged batches (sendpath_reap_some: Producer._reap_some then does it). */
static PyObject *SendPath_configure(SendPathObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8)
        return PyErr_Format(PyExc_TypeError, "configure(batch_type, acks, delivery_timeout_ms, "
                                             "reap_inflight, reap_completions, reap_some_inflight, "
                                             "completion_type, reap_some_batches)");
    int acks = (int)PyLong_AsLong(args[1]);
    double timeout_ms = PyFloat_AsDouble(args[2]);
    Py_ssize_t reap = PyLong_AsSsize_t(args[3]);
    Py_ssize_t reap_completions = PyLong_AsSsize_t(args[4]);
    Py_ssize_t reap_some = PyLong_AsSsize_t(args[5]);
    Py_ssize_t reap_some_batches = PyLong_AsSsize_t(args[7]);
    if (PyErr_Occurred())
        return NULL;
    if (reap_some_batches < 1)
        return PyErr_Format(PyExc_ValueError, "configure: reap_some_batches must be >= 1");
    if (args[6] != Py_None && (!PyType_Check(args[6]) ||
                               !PyType_IsSubtype((PyTypeObject *)args[6], &PyTuple_Type)))
        return PyErr_Format(PyExc_TypeError, "configure: completion_type must be a tuple "
                                             "subclass (shm.ring.Completion) or None");
    if (reap < 1 || reap_completions < 1 || reap_completions > SHMB_COMPLETIONS_MAX ||
        reap_some < 1 || reap_some > reap)
        return PyErr_Format(PyExc_ValueError, "configure: reap_inflight must be >= 1, "
                            "reap_completions in [1, %d] and reap_some_inflight in [1, "
                            "reap_inflight]", SHMB_COMPLETIONS_MAX);
    if (args[0] != Py_None && !PyType_Check(args[0]))
        return PyErr_Format(PyExc_TypeError, "configure: batch_type must be a class or None");
    BatchSlots slots;  /* set only once all is known (a refused class changes nothing) */
    if (args[0] != Py_None && batch_slots_init(args[0], &slots) < 0)
        return NULL;
    if (self->inf == NULL && (self->inf = PyFloat_FromDouble(Py_HUGE_VAL)) == NULL)
        return NULL;
    if (args[0] != Py_None)
        self->bslots = slots;
    Py_XINCREF(args[0] == Py_None ? NULL : args[0]);
    Py_XSETREF(self->batch_type, args[0] == Py_None ? NULL : args[0]);
    self->acks = acks;
    self->delivery_timeout_s = timeout_ms / 1000.0;
    self->reap_inflight = reap;
    self->reap_completions = (uint64_t)reap_completions;
    self->reap_some_inflight = reap_some;
    Py_XINCREF(args[6] == Py_None ? NULL : args[6]);
    Py_XSETREF(self->completion_type, args[6] == Py_None ? NULL : args[6]);
    self->reap_some_batches = reap_some_batches;
    Py_RETURN_NONE;
}

/* Sets obj.name = value, taking the reference to value (NULL: an error already set). */
static inline int set_attr_steal(PyObject *obj, PyObject *name, PyObject *value)
{
    if (value == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, value);
    Py_DECREF(value);
    return r;
}

/* _Batch(producer, topic, partition) without running its __init__ (a Python frame per written
 * frame, ~1/5 of a sparse send): the same slot values, set at their offsets. batch_slots_init
 * checked that __slots__ is exactly the slots set here; tests compare both ways' batches. */
static PyObject *batch_new(SendPathObject *self, PyObject *producer, PyObject *topic,
                           PyObject *partition)
{
    PyTypeObject *type = (PyTypeObject *)self->batch_type;
    PyObject *batch = type->tp_alloc(type, 0);  /* every slot NULL; GC-tracked */
    if (batch == NULL)
        return NULL;
    const Py_ssize_t *at = self->bslots.at;
    PyObject *values[B_NSLOTS] = {
        [B_PRODUCER] = Py_NewRef(producer), [B_TOPIC] = Py_NewRef(topic),
        [B_PARTITION] = Py_NewRef(partition), [B_COUNT] = PyLong_FromLong(0),
        [B_BASE_OFFSET] = PyLong_FromLong(-1), [B_ERROR] = Py_NewRef(Py_None),
        [B_DONE] = Py_NewRef(Py_False), [B_WRITER] = Py_NewRef(Py_None),
        [B_SEQUENCE] = PyLong_FromLong(-1), [B_DEADLINE] = Py_NewRef(self->inf)};
    for (int i = 0; i < B_NSLOTS; i++)
        *slot_at(batch, at[i]) = values[i];  /* small ints: cached, never NULL */
    return batch;
}

static Py_ssize_t resolve_core(PyObject *inflight, PyObject *completions, PyObject *batch_type,
                               const BatchSlots *bs, long long budget, long long *next_first_out,
                               long long *next_offset_out);

/* completion_type(items) as tuple.__new__ makes it (a NamedTuple's own __new__ is a Python
 * frame); takes the references to the four items (NULL among them: an error is set). */
static PyObject *completion_new(PyTypeObject *type, PyObject *items[4])
{
    PyObject *c = NULL;
    if (items[0] != NULL && items[1] != NULL && items[2] != NULL && items[3] != NULL)
        c = type->tp_alloc(type, 4);
    for (int i = 0; i < 4; i++) {
        if (c != NULL)
            PyTuple_SET_ITEM(c, i, items[i]);
        else
            Py_XDECREF(items[i]);
    }
    return c;
}

/* Producer._reap_some's common case (a few acknowledged batches resolved per write, so that
 * no one send resolves a dozing partition's whole round) without its Python: the ring's new
 * completions are moved to the producer's list (RingProducer.reap_completions), at most
 * reap_some_batches batches resolved from its front, and the rest of a completion the budget
 * ended in put back in front (one Python call per such send cost ~10 us p50 in a spinning
 * ping-pong, 2% of its sends: perf/RESULTS.md, sixteenth session). 1: done (the write goes
 * on); 0: the reference's (no completion type configured, a completion with an error code or
 * overwritten, anything unexpected), having changed nothing it would do differently; -1: an
 * error. Lock held, GIL held. */
static int sendpath_reap_some(SendPathObject *self, PyObject *writer, PyObject *inflight,
                              uint8_t *rb)
{
    if (self->completion_type == NULL)
        return 0;
    PyObject **n = self->wnames;
    PyTypeObject *ctype = (PyTypeObject *)self->completion_type;
    int result = -1;
    PyObject *ring = NULL, *pending = NULL, *read_obj = NULL, *fresh = NULL;
    if ((ring = PyObject_GetAttr(writer, n[W_RING])) == NULL ||
        (pending = PyObject_GetAttr(ring, n[W_COMPLETIONS])) == NULL ||
        (read_obj = PyObject_GetAttr(ring, n[W_COMPLETIONS_READ])) == NULL)
        goto done;
    if (!PyList_CheckExact(pending) || !PyLong_CheckExact(read_obj)) {
        result = 0;
        goto done;
    }
    unsigned long long read = PyLong_AsUnsignedLongLong(read_obj);
    if (read == (unsigned long long)-1 && PyErr_Occurred())
        goto done;
    uint64_t written = shmb_u64_load_acquire(rb + SHMB_RING_COMPLETIONS_WRITTEN_OFFSET);
    if (written - read > SHMB_COMPLETIONS_MAX) {  /* the reference's assertion says it */
        result = 0;
        goto done;
    }
    if (written != read) {
        /* Built aside first: on an error nothing has moved out of the ring. */
        if ((fresh = PyList_New(0)) == NULL)
            goto done;
        for (uint64_t k = read; k != written; k++) {  /* bounded: at most COMPLETIONS_MAX */
            const uint8_t *c = rb + SHMB_RING_COMPLETIONS_OFFSET +
                               (k % SHMB_COMPLETIONS_MAX) * SHMB_COMPLETION_BYTES;
            uint64_t first, last;
            int64_t base;
            int32_t code;
            memcpy(&first, c + SHMB_COMPL_FIRST_SEQUENCE_OFFSET, sizeof first);
            memcpy(&last, c + SHMB_COMPL_LAST_SEQUENCE_OFFSET, sizeof last);
            memcpy(&base, c + SHMB_COMPL_BASE_OFFSET_OFFSET, sizeof base);
            memcpy(&code, c + SHMB_COMPL_ERROR_CODE_OFFSET, sizeof code);
            PyObject *items[4] = {PyLong_FromUnsignedLongLong(first),
                                  PyLong_FromUnsignedLongLong(last), PyLong_FromLongLong(base),
                                  PyLong_FromLong(code)};
            PyObject *completion = completion_new(ctype, items);
            if (completion == NULL || PyList_Append(fresh, completion) < 0) {
                Py_XDECREF(completion);
                goto done;
            }
            Py_DECREF(completion);
        }
        /* The list first: should the count's update fail, the next read takes these again,
         * and a completion seen twice resolves nothing the second time. */
        Py_ssize_t end = PyList_GET_SIZE(pending);
        if (PyList_SetSlice(pending, end, end, fresh) < 0 ||
            set_attr_steal(ring, n[W_COMPLETIONS_READ], PyLong_FromUnsignedLongLong(written)) < 0)
            goto done;
        shmb_u64_store_release(rb + SHMB_RING_COMPLETIONS_READ_OFFSET, written);
    }
    Py_ssize_t len = PyList_GET_SIZE(pending);
    if (len == 0) {  /* acknowledged, its completion not yet written: the next send */
        result = 1;
        goto done;
    }
    long long next_first = -1, next_offset = -1;
    Py_ssize_t handled = resolve_core(inflight, pending, self->batch_type, &self->bslots,
                                      self->reap_some_batches, &next_first, &next_offset);
    if (handled < 0)
        goto done;
    if (handled > 0 && PyList_SetSlice(pending, 0, handled, NULL) < 0)
        goto done;
    if (next_first >= 0) {
        PyObject *rest = PyList_GET_ITEM(pending, 0);  /* a 4-tuple: resolve_core read it */
        PyObject *items[4] = {PyLong_FromLongLong(next_first),
                              Py_NewRef(PyTuple_GET_ITEM(rest, 1)),
                              PyLong_FromLongLong(next_offset),
                              Py_NewRef(PyTuple_GET_ITEM(rest, 3))};
        PyObject *put_back = completion_new(ctype, items);
        if (put_back == NULL || PyList_SetItem(pending, 0, put_back) < 0)
            goto done;
        result = 1;
    } else {
        /* Stopped before the budget at an error code or an overwritten completion: the
         * reference's (_reap_some hands those to _reap). */
        result = handled < len ? 0 : 1;
    }
done:
    Py_XDECREF(fresh);
    Py_XDECREF(read_obj);
    Py_XDECREF(pending);
    Py_XDECREF(ring);
    return result;
}

/* The write of a due batch (Producer._write's common case) without a Python frame: seal the
 * accumulator's records into one frame, copy it into the bound ring, ring the doorbell, start
 * a new batch, and put the written one in flight. Declines (returns 0, having changed nothing)
 * for everything else, and Producer._after_append then runs the reference: acks=0, a keyless
 * topic's sticky accumulator (the switch picks a partition at random), a stopped partition, a
 * ring whose completions are due to be read (_reap), a ring without room (the blocking write),
 * a corrupt ring. 1: written; -1: an error (a new batch could not be made, out of memory). Lock
 * held, GIL held throughout (the batch is small: the write of a large one is the reference's). */
static int sendpath_write(SendPathObject *self, PyObject *producer, PyObject *acc,
                          AccumulatorObject *records)
{
    PyObject **n = self->wnames;
    if (self->batch_type == NULL || self->acks == 0 || records->acc.count == 0 ||
        records->ring.obj == NULL || records->batch == NULL ||
        !Py_IS_TYPE(records->batch, (PyTypeObject *)self->batch_type))  /* its slots are set below */
        return 0;
    int result = -1;
    PyObject *writer = NULL, *topic = NULL, *partition = NULL, *control = NULL, *cbuf = NULL,
             *inflight = NULL, *new_batch = NULL, *batch = NULL;
    Py_buffer dv = {0};
    if ((writer = PyObject_GetAttr(acc, n[W_WRITER])) == NULL ||
        (topic = PyObject_GetAttr(acc, n[W_TOPIC])) == NULL ||
        (inflight = PyObject_GetAttr(writer, n[W_INFLIGHT])) == NULL)
        goto done;
    PyObject *sticky = PyDict_GetItemWithError(self->sticky, topic);
    if (sticky == NULL && PyErr_Occurred())
        goto done;
    Py_ssize_t in_flight = PyObject_Size(inflight);
    if (in_flight < 0)
        goto done;
    /* The reference reaps (_write): completions it has not read fill the ring's slots (a
     * partition appending frame by frame writes one per frame), or batches pile up. */
    const uint8_t *rb = records->ring.buf;
    uint64_t unread = shmb_u64_load_acquire(rb + SHMB_RING_COMPLETIONS_WRITTEN_OFFSET) -
                      shmb_u64_load_relaxed(rb + SHMB_RING_COMPLETIONS_READ_OFFSET);
    if (sticky == acc || in_flight + 1 >= self->reap_inflight ||
        unread >= self->reap_completions) {
        result = 0;
        goto done;
    }
    /* The oldest batch in flight acknowledged (a dozing partition's round acknowledges a few
     * hundred at once): a few of them are resolved per write (sendpath_reap_some, else the
     * reference's _reap_some), so no one send resolves them all (~50 us in a ping-pong;
     * perf/RESULTS.md, fifteenth session). */
    if (in_flight > 0 && in_flight + 1 >= self->reap_some_inflight) {
        PyObject *oldest = PySequence_GetItem(inflight, 0);
        if (oldest == NULL)
            goto done;
        long long seq = Py_IS_TYPE(oldest, (PyTypeObject *)self->batch_type)
                            ? batch_slot_int(oldest, self->bslots.at[B_SEQUENCE]) : -2;
        Py_DECREF(oldest);
        if (seq < 0) {
            result = 0;
            goto done;
        }
        if ((uint64_t)seq < shmb_u64_load_acquire(rb + SHMB_RING_ACKED_SEQUENCE_OFFSET)) {
            int reaped = sendpath_reap_some(self, writer, inflight, (uint8_t *)rb);
            if (reaped <= 0) {
                result = reaped;
                goto done;
            }
        }
    }
    if ((control = PyObject_GetAttr(writer, n[W_CONTROL])) == NULL ||
        (cbuf = PyObject_GetAttr(control, n[W_BUF])) == NULL ||
        region_view(cbuf, 1, &dv, "write doorbell") < 0)
        goto done;
    if (dv.len < SHMB_CONTROL_REGISTRY_OFFSET ||
        shmb_u32_load_acquire((uint8_t *)dv.buf + SHMB_CTL_PARTITION_STATUS_OFFSET) ==
            SHMB_PARTITION_STATUS_STOPPED) {
        result = 0;
        goto done;
    }
    if ((partition = PyObject_GetAttr(acc, n[W_PARTITION])) == NULL)
        goto done;
    new_batch = batch_new(self, producer, topic, partition);
    if (new_batch == NULL)
        goto done;

    /* The write: what Accumulator.write_ring does, for a small batch (GIL held). */
    Py_ssize_t count = records->acc.count;
    /* No producer id, epoch or sequence: batches are stored as sent, and the offsets the
     * commit sets in them, not these fields, tell a restarted partition what it appended. */
    uint64_t first_seq, wpos;
    size_t len;
    shmb_ring_error err;
    int r = acc_write_frame(records, records->ring.buf, (size_t)records->ring.len, dv.buf, -1,
                            -1, -1, &first_seq, &wpos, &len, &err);
    if (r != SHMB_RING_OK) {  /* no room, too large, corrupt: the reference sees it again */
        result = 0;
        goto done;
    }

    /* From here the frame is in the ring: only bookkeeping, as the reference's, in its order. */
    batch = records->batch;  /* the written batch: its futures point to it */
    records->batch = new_batch;
    new_batch = NULL;
    const Py_ssize_t *at = self->bslots.at;
    if (slot_set(batch, at[B_COUNT], PyLong_FromSsize_t(count)) < 0 ||
        set_attr_steal(writer, n[W_NEXT_SEQUENCE], PyLong_FromUnsignedLongLong(first_seq + 1)) < 0 ||
        set_attr_steal(writer, n[W_WRITTEN_POSITION], PyLong_FromUnsignedLongLong(wpos)) < 0 ||
        slot_set(batch, at[B_WRITER], Py_NewRef(writer)) < 0 ||
        slot_set(batch, at[B_SEQUENCE], PyLong_FromUnsignedLongLong(first_seq)) < 0 ||
        slot_set(batch, at[B_DEADLINE], PyFloat_FromDouble((double)shmb_monotonic_ns() / 1e9 +
                                                           self->delivery_timeout_s)) < 0)
        goto done;
    PyObject *appended = PyObject_CallMethodOneArg(inflight, n[W_APPEND], batch);
    if (appended == NULL)
        goto done;
    Py_DECREF(appended);
    result = 1;
done:
    if (dv.buf != NULL)
        PyBuffer_Release(&dv);
    Py_XDECREF(batch);
    Py_XDECREF(new_batch);
    Py_XDECREF(partition);
    Py_XDECREF(cbuf);
    Py_XDECREF(control);
    Py_XDECREF(inflight);
    Py_XDECREF(topic);
    Py_XDECREF(writer);
    return result;
}

/* args[0]: the producer; then send's arguments (topic, value, key=None, partition=None,
 * headers=None, timestamp=None). */
static PyObject *sendpath_call(PyObject *op, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames)
{
    SendPathObject *self = (SendPathObject *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    /* a[0..5]: topic, value, key, partition, headers, timestamp; NULL: not given */
    PyObject *a[6] = {NULL, NULL, Py_None, Py_None, Py_None, Py_None};
    if (!self->enabled || self->accs == NULL || nargs < 1 || nargs > 7)
        return sendpath_slow(self, args, nargsf, kwnames);
    for (Py_ssize_t i = 1; i < nargs; i++)
        a[i - 1] = args[i];
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t j = 0; j < nkw; j++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, j);
        int i = 0;
        while (i < 6 && self->names[i] != name) /* interned: a pointer test (else: slow) */
            i++;
        if (i == 6 || i < nargs - 1)  /* unknown, not interned, or given twice: slow */
            return sendpath_slow(self, args, nargsf, kwnames);
        a[i] = args[nargs + j];
    }
    PyObject *topic = a[0], *key = a[2], *partition = a[3];
    /* keyed: a bytes key without a partition (Kafka's murmur2 mapping, below) */
    int keyed = partition == Py_None && key != Py_None;
    if (topic == NULL || a[1] == NULL || !PyUnicode_CheckExact(topic) ||
        (keyed ? !PyBytes_CheckExact(key) || self->counts == NULL
               : partition != Py_None && !PyLong_CheckExact(partition)))
        return sendpath_slow(self, args, nargsf, kwnames);

    PyObject *r;
    if (self->mutex != NULL) {
        if (!shmb_mutex_trylock(&self->mutex->word) && mutex_lock_blocking(self->mutex, -1.0) < 0)
            return NULL;
    } else {
        r = PyObject_Vectorcall(self->acquire, NULL, 0, NULL);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    /* Lock held from here to every return (as the reference's try/finally). */
    PyObject *acc;
    if (partition == Py_None && !keyed) {
        acc = PyDict_GetItemWithError(self->sticky, topic);
    } else {
        int overflow = 0;
        long p;
        if (keyed) {
            /* The partition count as the reference's _partitions() has it cached, while
             * fresh (metadata.max.age); else the reference re-reads it. */
            PyObject *cached = PyDict_GetItemWithError(self->counts, topic);
            if (cached == NULL || !PyTuple_CheckExact(cached) || PyTuple_GET_SIZE(cached) != 2) {
                if (PyErr_Occurred()) {
                    sendpath_unlock(self);
                    return NULL;
                }
                goto slow;
            }
            long count = PyLong_AsLong(PyTuple_GET_ITEM(cached, 0));
            double expiry = PyFloat_AsDouble(PyTuple_GET_ITEM(cached, 1));
            if (PyErr_Occurred()) {
                PyErr_Clear();
                goto slow;
            }
            if (count <= 0 || count > INT32_MAX ||
                (double)shmb_monotonic_ns() / 1e9 >= expiry)
                goto slow;
            p = shmb_partition_for_key(PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key),
                                       (int32_t)count);
        } else {
            p = PyLong_AsLongAndOverflow(partition, &overflow);
        }
        if (topic == self->cached_topic && p == self->cached_partition && !overflow &&
            !(p == -1 && PyErr_Occurred())) {
            acc = self->cached_acc;
        } else {
            PyErr_Clear();  /* an int too large for a long is simply not cached */
            PyObject *po = keyed ? PyLong_FromLong(p) : (Py_INCREF(partition), partition);
            PyObject *tk = po == NULL ? NULL : PyTuple_Pack(2, topic, po);
            Py_XDECREF(po);
            acc = tk == NULL ? NULL : PyDict_GetItemWithError(self->accs, tk);
            Py_XDECREF(tk);
            if (acc != NULL && !overflow) {
                Py_INCREF(topic);
                Py_XSETREF(self->cached_topic, topic);
                Py_INCREF(acc);
                Py_XSETREF(self->cached_acc, acc);
                self->cached_partition = p;
            }
        }
    }
    if (acc == NULL || !Py_IS_TYPE(acc, self->acc_type)) {
        if (PyErr_Occurred()) {
            sendpath_unlock(self);
            return NULL;
        }
        goto slow;
    }
    PyObject *records = *(PyObject **)((char *)acc + self->records_offset);
    if (records == NULL || !Py_IS_TYPE(records, self->records_type))
        goto slow;
    Py_INCREF(acc);
    Py_INCREF(records);
    PyObject *const append_args[4] = {a[1], key, a[4], a[5]}; /* value, key, headers, ts */
    PyObject *future = Accumulator_append((AccumulatorObject *)records, append_args, 4);
    if (future == Py_None) { /* full, or too large: nothing was added; the reference decides */
        Py_DECREF(future);
        Py_DECREF(records);
        Py_DECREF(acc);
        goto slow;
    }
    int wrote = 0;
    if (future != NULL && ((AccumulatorObject *)records)->write_due) {
        wrote = sendpath_write(self, args[0], acc, (AccumulatorObject *)records);
        if (wrote < 0)
            Py_CLEAR(future);
        /* The sparse-send gap (acc_sparse_due) counts from the end of this send's own write:
         * a loop sending as fast as it can, each send writing its frame, would otherwise see
         * the write's ~1-2 us as a gap and write every record as a frame of its own. */
        if (wrote > 0 && ((AccumulatorObject *)records)->inflight_max > 0)
            ((AccumulatorObject *)records)->last_append_ns = wall_clock_ns();
    }
    if (future != NULL && !wrote &&
        (((AccumulatorObject *)records)->write_due || !self->armed)) {
        PyObject *call[3] = {NULL, args[0], acc};
        r = PyObject_Vectorcall(self->after_append, call + 1,
                                2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (r == NULL)
            Py_CLEAR(future);
        else
            Py_DECREF(r);
    }
    Py_DECREF(records);
    Py_DECREF(acc);
    if (future == NULL) {
        /* keep the error: the release must not clobber it */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (sendpath_unlock(self) < 0) {
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
            return NULL;
        }
        PyErr_Restore(et, ev, tb);
        return NULL;
    }
    if (sendpath_unlock(self) < 0) {
        Py_DECREF(future);
        return NULL;
    }
    return future;
slow:
    if (sendpath_unlock(self) < 0)
        return NULL;
    return sendpath_slow(self, args, nargsf, kwnames);
}

static PyMethodDef SendPath_methods[] = {
    {"reset", (PyCFunction)(void (*)(void))SendPath_reset, METH_FASTCALL,
     "reset(lock, accs, sticky): use these (the producer made new ones); not armed"},
    {"configure", (PyCFunction)(void (*)(void))SendPath_configure, METH_FASTCALL,
     "configure(batch_type, acks, delivery_timeout_ms, reap_inflight, reap_completions, "
     "reap_some_inflight): for the C write of a due batch; batch_type None: every due batch "
     "goes to the reference"},
    {"forget", (PyCFunction)SendPath_forget, METH_NOARGS,
     "forget(): an accumulator was removed from accs; drop the cached (topic, partition)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef SendPath_members[] = {
    {"armed", T_INT, offsetof(SendPathObject, armed), 0,
     "the sender thread knows records are pending (Producer._sender_armed)"},
    {"enabled", T_INT, offsetof(SendPathObject, enabled), 0,
     "0: every call goes to the Python reference (tests compare both)"},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(SendPathObject, vectorcall), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot SendPath_slots[] = {
    {Py_tp_new, (void *)SendPath_new},
    {Py_tp_dealloc, (void *)SendPath_dealloc},
    {Py_tp_traverse, (void *)SendPath_traverse},
    {Py_tp_clear, (void *)SendPath_clear},
    {Py_tp_methods, (void *)SendPath_methods},
    {Py_tp_members, (void *)SendPath_members},
    {Py_tp_call, (void *)PyVectorcall_Call},
    {Py_tp_doc, (void *)"SendPath(acc_type, slow, after_append)\n--\n\n"
                        "Producer.send's fast path in C; owned by one Producer."},
    {0, NULL},
};

static PyType_Spec SendPath_spec = {
    .name = "shmbroker._native.SendPath",
    .basicsize = sizeof(SendPathObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC |
             Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = SendPath_slots,
};

/* ==== resolve_inflight: a producer's reap without a Python frame per batch =================
 * Producer._resolve's common case in C. A dozing partition acknowledges a whole round at once
 * (one completion for ~150 sparse frames) and a producer reads completions every few hundred
 * batches, so the reference resolved ~400 batches in one go: ~60-100 us of Python inside one
 * send, a stalled round trip in every few hundred (perf/RESULTS.md, fifteenth session). Here a
 * batch costs its __slots__ reads and writes at their offsets (as their descriptors do) and
 * one popleft. */

/* resolve_inflight's work for a checked list `completions` and batch_type's slots `s`: the
 * completions handled (wholly resolved) from the front; with a budget (> 0), *next_first and
 * *next_offset say where the rest of a completion the budget ended in starts (-1: none).
 * -1 with an exception set. Also sendpath_reap_some's. */
static Py_ssize_t resolve_core(PyObject *inflight, PyObject *completions, PyObject *batch_type,
                               const BatchSlots *bs, long long budget, long long *next_first_out,
                               long long *next_offset_out)
{
    BatchSlots s = *bs;
    long long resolved = 0, next_first = -1, next_offset = -1;
    PyObject *popleft = PyObject_GetAttrString(inflight, "popleft");
    if (popleft == NULL)
        return -1;
    Py_ssize_t handled = 0, n = PyList_GET_SIZE(completions);
    for (; handled < n; handled++) {
        PyObject *c = PyList_GET_ITEM(completions, handled);
        if (!PyTuple_Check(c) || PyTuple_GET_SIZE(c) != 4)
            break;
        long long v[4];
        int bad = 0;
        for (int i = 0; i < 4; i++) {
            PyObject *x = PyTuple_GET_ITEM(c, i);
            int overflow = 0;
            v[i] = PyLong_CheckExact(x) ? PyLong_AsLongLongAndOverflow(x, &overflow) : -1;
            bad |= overflow || v[i] < 0;
        }
        /* An error code, or a batch whose completion was overwritten: the reference's. */
        if (bad || v[3] != 0)
            break;
        long long first = v[0], last = v[1], offset = v[2];
        int stop = 0;
        for (Py_ssize_t guard = 0;; guard++) {  /* bounded: each pass pops one, or ends */
            Py_ssize_t left = PyObject_Size(inflight);
            if (left < 0)
                goto error;
            if (left == 0)
                break;
            PyObject *batch = PySequence_GetItem(inflight, 0);
            if (batch == NULL)
                goto error;
            long long seq = Py_IS_TYPE(batch, (PyTypeObject *)batch_type)
                                ? batch_slot_int(batch, s.at[B_SEQUENCE]) : -2;
            long long count = seq >= 0 ? batch_slot_int(batch, s.at[B_COUNT]) : -2;
            if (seq < 0 || count < 0) {
                Py_DECREF(batch);
                PyErr_Format(PyExc_TypeError, "resolve_inflight: an in-flight entry is not a "
                             "written %s (int sequence and count)", ((PyTypeObject *)batch_type)->tp_name);
                goto error;
            }
            if (seq > last) {  /* the next completion's (or not yet acknowledged) */
                Py_DECREF(batch);
                break;
            }
            if (seq < first) {
                Py_DECREF(batch);
                if (guard == 0) {  /* its completion was overwritten: the reference fails it */
                    stop = 1;
                    break;
                }
                /* Sequences are consecutive: after one >= first, none is below it. */
                PyErr_Format(PyExc_RuntimeError, "resolve_inflight: in-flight sequence %lld "
                             "after a later one", seq);
                goto error;
            }
            if (resolved == budget) {  /* budget spent: the rest of this one from here */
                Py_DECREF(batch);
                next_first = seq;
                next_offset = offset;
                stop = 1;
                break;
            }
            resolved++;
            /* Done already: failed by its delivery timeout (Producer._expire), kept in flight
             * so that its records are counted here; its outcome stays. */
            int failed = *slot_at(batch, s.at[B_DONE]) == Py_True;
            PyObject *base = failed ? Py_NewRef(Py_None) : PyLong_FromLongLong(offset);
            PyObject *popped = base == NULL ? NULL : PyObject_CallNoArgs(popleft);
            if (popped == NULL) {
                Py_XDECREF(base);
                Py_DECREF(batch);
                goto error;
            }
            Py_DECREF(popped);  /* the same object as batch */
            if (failed) {
                Py_DECREF(base);
            } else {
                slot_set(batch, s.at[B_BASE_OFFSET], base);
                Py_INCREF(Py_True);
                slot_set(batch, s.at[B_DONE], Py_True);
            }
            Py_DECREF(batch);
            offset += count;
        }
        if (stop)
            break;
    }
    Py_DECREF(popleft);
    *next_first_out = next_first;
    *next_offset_out = next_offset;
    return handled;
error:
    Py_DECREF(popleft);
    return -1;
}

static PyObject *py_resolve_inflight(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 && nargs != 4)
        return PyErr_Format(PyExc_TypeError,
                            "resolve_inflight(inflight, completions, batch_type[, budget])");
    PyObject *inflight = args[0], *completions = args[1], *batch_type = args[2];
    long long budget = -1, next_first = -1, next_offset = -1;
    if (nargs == 4 && ((budget = PyLong_AsLongLong(args[3])) < 1)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "resolve_inflight: budget must be >= 1");
        return NULL;
    }
    if (!PyList_CheckExact(completions) || !PyType_Check(batch_type))
        return PyErr_Format(PyExc_TypeError,
                            "resolve_inflight: completions must be a list, batch_type a type");
    BatchSlots s;
    if (batch_slots_cached(get_state(module), batch_type, &s) < 0)
        return NULL;
    Py_ssize_t handled = resolve_core(inflight, completions, batch_type, &s, budget,
                                      &next_first, &next_offset);
    if (handled < 0)
        return NULL;
    if (budget > 0)
        return Py_BuildValue("(nLL)", handled, next_first, next_offset);
    return PyLong_FromSsize_t(handled);
}

/* ==== SendMethod: the descriptor behind Producer.send =======================================
 * On the class: the Python reference function (Producer.send(p, ...) runs it). On an
 * instance: a bound method of its `_send_path` (the reference's when it has none). */

typedef struct {
    PyObject_HEAD
    PyObject *func;
    PyObject *path_name;
} SendMethodObject;

static PyObject *SendMethod_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *func;
    if (!PyArg_ParseTuple(args, "O:SendMethod", &func))
        return NULL;
    SendMethodObject *self = (SendMethodObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(func);
    self->func = func;
    self->path_name = PyUnicode_InternFromString("_send_path");
    if (self->path_name == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *SendMethod_get(PyObject *op, PyObject *obj, PyObject *type)
{
    SendMethodObject *self = (SendMethodObject *)op;
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self->func);
        return self->func;
    }
    PyObject *path = PyObject_GetAttr(obj, self->path_name);
    if (path == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
        return PyMethod_New(self->func, obj);
    }
    PyObject *bound = PyMethod_New(path, obj);
    Py_DECREF(path);
    return bound;
}

static int SendMethod_traverse(SendMethodObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->func);
    return 0;
}

static int SendMethod_clear(SendMethodObject *self)
{
    Py_CLEAR(self->func);
    Py_CLEAR(self->path_name);
    return 0;
}

static void SendMethod_dealloc(SendMethodObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    SendMethod_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMemberDef SendMethod_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(SendMethodObject, func), READONLY,
     "the Python reference"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot SendMethod_slots[] = {
    {Py_tp_new, (void *)SendMethod_new},
    {Py_tp_dealloc, (void *)SendMethod_dealloc},
    {Py_tp_traverse, (void *)SendMethod_traverse},
    {Py_tp_clear, (void *)SendMethod_clear},
    {Py_tp_descr_get, (void *)SendMethod_get},
    {Py_tp_members, (void *)SendMethod_members},
    {Py_tp_doc, (void *)"SendMethod(func)\n--\n\n"
                        "Class: func; instance: a bound method of its _send_path."},
    {0, NULL},
};

static PyType_Spec SendMethod_spec = {
    .name = "shmbroker._native.SendMethod",
    .basicsize = sizeof(SendMethodObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = SendMethod_slots,
};

/* ==== the C drain round ===================================================================== */

/* Region views and ring descriptors of one drain_round call (a few rings on the stack: no
 * allocation per round in the common case). */
enum { DRAIN_HOLD_ON_STACK = 4 };
typedef struct {
    Py_buffer *views;
    shmb_drain_ring *rings;
    Py_ssize_t n;
    Py_buffer views_stack[DRAIN_HOLD_ON_STACK];
    shmb_drain_ring rings_stack[DRAIN_HOLD_ON_STACK];
} drain_hold;

static void drain_hold_free(drain_hold *h)
{
    for (Py_ssize_t i = 0; i < h->n; i++)
        PyBuffer_Release(&h->views[i]);
    if (h->views != h->views_stack)
        PyMem_Free(h->views);
    if (h->rings != h->rings_stack)
        PyMem_Free(h->rings);
}

/* One (region, position, expected_sequence) of drain_round's rings: read directly from an exact
 * 3-tuple (the caller's case), else through PyArg_ParseTuple (its errors). */
static int drain_ring_item(PyObject *item, PyObject **buf, unsigned long long *position,
                           unsigned long long *expected)
{
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 3)
        return PyArg_ParseTuple(item, "OKK:drain_round ring", buf, position, expected) ? 0 : -1;
    *buf = PyTuple_GET_ITEM(item, 0);
    *position = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(item, 1));
    if (*position == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *expected = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(item, 2));
    if (*expected == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    return 0;
}

static int drain_hold_init(drain_hold *h, PyObject *rings)
{
    h->n = 0;
    h->views = h->views_stack;
    h->rings = h->rings_stack;
    PyObject *seq = PySequence_Fast(rings, "drain_round: rings must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > DRAIN_HOLD_ON_STACK) {
        h->views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
        h->rings = PyMem_Calloc((size_t)n, sizeof(shmb_drain_ring));
        if (h->views == NULL || h->rings == NULL) {
            Py_DECREF(seq);
            PyErr_NoMemory();
            return -1;
        }
    } else {
        memset(h->rings_stack, 0, sizeof h->rings_stack);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *buf;
        unsigned long long position, expected;
        if (drain_ring_item(PySequence_Fast_GET_ITEM(seq, i), &buf, &position, &expected) < 0 ||
            region_view(buf, 1, &h->views[i], "drain_round") < 0) {
            Py_DECREF(seq);
            return -1;
        }
        h->n = i + 1;
        h->rings[i].region = h->views[i].buf;
        h->rings[i].region_len = (size_t)h->views[i].len;
        h->rings[i].position = position;
        h->rings[i].expected_sequence = expected;
    }
    Py_DECREF(seq);
    return 0;
}

/* PartitionLog.native_append_state()'s tuple (NativeAppendState, in its field order) into
 * `log`: each item read directly, with PyArg's conversions ('i' int with range check, 'L' long
 * long, 'K' unsigned masked, 'p' truth). PyArg_ParseTuple with the same format took ~3,000
 * instructions per round; a "(...)" unit in drain_round's format ~21,000 (it goes through the
 * NamedTuple's __getitem__), measured with callgrind (perf/RESULTS.md). */
static int drain_log_state(PyObject *t, shmb_drain_log *log, unsigned long long *segment_size,
                           unsigned long long *segment_bytes)
{
    static const char format[] = "iLLLKiLLKLLLLLLLLLLLpL";
    void *const to[] = {
        &log->fd, &log->log_end_offset, &log->log_start_offset, &log->segment_base_offset,
        segment_size, &log->leader_epoch, &log->batch_bytes_max, &log->batch_records_max,
        segment_bytes, &log->segment_ms, &log->offset_entries_left, &log->time_entries_left,
        &log->first_batch_max_timestamp, &log->created_ms, &log->last_offset_max,
        &log->interval_bytes, &log->bytes_since_entry, &log->max_timestamp,
        &log->offset_of_max_timestamp, &log->now_ms, &log->flush_due, &log->flush_records_left};
    enum { FIELDS = sizeof format - 1 };
    _Static_assert(sizeof to / sizeof to[0] == FIELDS, "one destination per field");
    _Static_assert(sizeof(int64_t) == sizeof(long long) && sizeof(long) == sizeof(long long),
                   "'L' fields are int64_t, read as long");
    if (PyTuple_GET_SIZE(t) != FIELDS) {
        PyErr_Format(PyExc_TypeError, "drain_round: log state must have %d fields, not %zd",
                     (int)FIELDS, PyTuple_GET_SIZE(t));
        return -1;
    }
    for (Py_ssize_t i = 0; i < FIELDS; i++) { /* bounded by FIELDS */
        PyObject *item = PyTuple_GET_ITEM(t, i);
        switch (format[i]) {
        case 'i': {
            long v = PyLong_AsLong(item);
            if (v == -1 && PyErr_Occurred())
                return -1;
            if (v < INT_MIN || v > INT_MAX) {
                PyErr_Format(PyExc_OverflowError, "drain_round: log state field %zd out of int "
                             "range", i);
                return -1;
            }
            *(int *)to[i] = (int)v;
            break;
        }
        case 'L': { /* PyLong_AsLong: 64 bits here, and no byte-array path for 2-digit ints */
            long v = PyLong_AsLong(item);
            if (v == -1 && PyErr_Occurred())
                return -1;
            *(long long *)to[i] = v;
            break;
        }
        case 'K': {
            unsigned long long v = PyLong_AsUnsignedLongLongMask(item);
            if (v == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            *(unsigned long long *)to[i] = v;
            break;
        }
        default: { /* 'p' */
            int v = PyObject_IsTrue(item);
            if (v < 0)
                return -1;
            *(int *)to[i] = v;
            break;
        }
        }
    }
    return 0;
}

/* A tuple of n new references (stolen; NULL if any is NULL, all released). */
static PyObject *tuple_steal(Py_ssize_t n, PyObject *const *items)
{
    PyObject *t = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    t = PyTuple_New(n);
    if (t == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
    return t;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

static PyObject *entries_list(const shmb_drain_entry *e, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list != NULL && i < n; i++) {
        PyObject *items[2] = {PyLong_FromLongLong(e[i].a), PyLong_FromLongLong(e[i].b)};
        PyObject *t = tuple_steal(2, items);
        if (t == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

static PyObject *drain_done_result(const drain_hold *h, const shmb_drain_result *r)
{
    PyObject *rings = PyTuple_New(h->n);
    if (rings == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < h->n; i++) {
        const shmb_drain_ring *g = &h->rings[i];
        PyObject *error = Py_NewRef(Py_None);
        if (g->release_failed) {
            Py_DECREF(error);
            error = Py_BuildValue("(sK)", g->release_err.message,
                                  (unsigned long long)g->release_err.position);
        }
        PyObject *items[4] = {PyLong_FromUnsignedLongLong(g->next_position),
                              PyLong_FromUnsignedLong(g->count),
                              PyLong_FromLongLong(g->base_offset), error};
        PyObject *t = tuple_steal(4, items);
        if (t == NULL) {
            Py_DECREF(rings);
            return NULL;
        }
        PyTuple_SET_ITEM(rings, i, t);
    }
    PyObject *appended = Py_NewRef(Py_None);
    if (r->frames != 0) {
        Py_DECREF(appended);
        PyObject *items[12] = {
            PyLong_FromUnsignedLongLong(r->frames), PyLong_FromUnsignedLongLong(r->records),
            PyLong_FromUnsignedLongLong(r->batches), PyLong_FromUnsignedLongLong(r->bytes),
            PyLong_FromLongLong(r->log_end_offset), PyLong_FromUnsignedLongLong(r->segment_size),
            r->first_batch_set ? PyLong_FromLongLong(r->first_batch_max_timestamp)
                               : Py_NewRef(Py_None),
            PyLong_FromLongLong(r->bytes_since_entry), PyLong_FromLongLong(r->max_timestamp),
            PyLong_FromLongLong(r->offset_of_max_timestamp),
            entries_list(r->offset_entries, r->offset_entries_count),
            entries_list(r->time_entries, r->time_entries_count)};
        appended = tuple_steal(12, items);
    }
    PyObject *items[3] = {PyLong_FromLong(SHMB_DRAIN_DONE), rings, appended};
    return tuple_steal(3, items);
}

/* An int argument of drain_round (PyArg's 'K': unsigned, masked; 'i': int, range-checked). */
static int drain_arg_u64(PyObject *o, unsigned long long *out)
{
    *out = PyLong_AsUnsignedLongLongMask(o);
    return *out == (unsigned long long)-1 && PyErr_Occurred() ? -1 : 0;
}

static int drain_arg_int(PyObject *o, int *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "drain_round: argument out of int range");
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* The doorbell sleep that may precede a round (drain_sleep_round), and with rounds_max > 1
 * the steady-state loop after it (drain_loop). */
typedef struct {
    uint32_t seen;
    long long timeout_ms, spin_ns, doze_ms;
    int status; /* out: the last sleep's WAIT_* status */
    long long rounds_max, budget_ms, registry_seen; /* drain_loop; rounds_max <= 1: one round */
    long long loop_doze_ms; /* drain_loop's dozes after a round (0: none, the loop ends) */
    int rounds; /* out: rounds drain_loop ran */
} drain_sleep_args;

/* CLOCK_REALTIME in ms, floored as Python's // (ns before 1970 are negative): the wall clock
 * of the log (wall_clock_ms) and of the wake-up round. */
static int drain_wall_clock_ms(int64_t *out)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return -1;
    long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    long long ms = ns / 1000000;
    if (ns % 1000000 < 0)
        ms -= 1;
    *out = ms;
    return 0;
}

/* Appends n entries (a round's, malloc'd) to *dst (count *dst_n), realloc'd; 0, or -1 when
 * out of memory (*dst unchanged). */
static int entries_join(shmb_drain_entry **dst, size_t *dst_n, const shmb_drain_entry *src,
                        size_t n)
{
    if (n == 0)
        return 0;
    shmb_drain_entry *grown = realloc(*dst, (*dst_n + n) * sizeof *grown);
    if (grown == NULL)
        return -1;
    memcpy(grown + *dst_n, src, n * sizeof *src);
    *dst = grown;
    *dst_n += n;
    return 0;
}

/* Steady-state rounds without Python in between (docs/design/partition.md, "What a round
 * costs"): the doorbell sleep (or doze), a round, and while each round appended frames and
 * left nothing for Python (no broken or held-back ring; index entries are gathered), the next
 * sleep prepared as PartitionOwner.wait_for_work does (at once when a picked ring is readable)
 * and the next round, from the state the last one left: the log end, the segment's size, the
 * index rule and the indexes' room in `log`, each ring's position and sequence. It ends at a
 * sleep that times out
 * or is interrupted, a round that takes nothing or declines (nothing changed: Python's round
 * runs it), a registry change, sl->rounds_max rounds or sl->budget_ms. *out is the rounds'
 * sum (the last round's ends, every round's index entries in order), h->rings[i].count each
 * ring's total; the status is the first round's when it did not run DONE, WRITE_FAILED when a
 * later write failed or its entries found no memory (the process exits on that LogError and
 * its restart recovers), else DONE (-1: no round ran).
 * Runs without the GIL; `totals` and `saved` have room for h->n entries. */
static int drain_loop(drain_hold *h, uint8_t *ctl, size_t ctl_len, uint8_t *scratch,
                      size_t scratch_len, shmb_drain_log *log, drain_sleep_args *sl,
                      shmb_drain_result *out, uint64_t *totals, shmb_drain_ring *saved)
{
    int status = -1, rounds = 0, do_sleep = 1;
    uint32_t seen = sl->seen;
    long long budget = sl->budget_ms < sl->timeout_ms ? sl->budget_ms : sl->timeout_ms;
    int64_t deadline = shmb_monotonic_ns() + (budget > 0 ? budget : 0) * 1000000LL;
    long long timeout_ms = sl->timeout_ms;
    memset(out, 0, sizeof *out);
    for (Py_ssize_t i = 0; i < h->n; i++)
        totals[i] = 0;
    while (rounds < sl->rounds_max) { /* bounded by rounds_max */
        if (do_sleep) {
            /* The call's sleep (a plain one after an idle spell), then only dozes. */
            sl->status = shmb_drain_sleep(ctl, seen, timeout_ms, sl->spin_ns,
                                          rounds == 0 ? sl->doze_ms : sl->loop_doze_ms);
            if (sl->status == SHMB_WAIT_TIMEOUT || sl->status == SHMB_WAIT_INTERRUPTED)
                break;
        }
        if (drain_wall_clock_ms(&log->now_ms) < 0)
            break;
        /* A round that declines (or takes nothing) may still have moved the rings' outputs
         * (what it collected): Python must see the last appending round's. */
        if (rounds > 0)
            memcpy(saved, h->rings, (size_t)h->n * sizeof *saved);
        shmb_drain_result r;
        int st = shmb_drain_round(h->rings, (size_t)h->n, ctl, ctl_len, scratch, scratch_len,
                                  log, &r);
        if (rounds == 0 || st == SHMB_DRAIN_WRITE_FAILED) {
            shmb_drain_result_free(out);
            *out = r;
            status = st;
            if (st != SHMB_DRAIN_DONE)
                break;
        } else if (st != SHMB_DRAIN_DONE || r.frames == 0) {
            shmb_drain_result_free(&r); /* declined, or nothing: nothing changed */
            memcpy(h->rings, saved, (size_t)h->n * sizeof *saved);
            break;
        } else {
            out->frames += r.frames;
            out->records += r.records;
            out->batches += r.batches;
            out->bytes += r.bytes;
            out->log_end_offset = r.log_end_offset;
            out->segment_size = r.segment_size;
            out->bytes_since_entry = r.bytes_since_entry;
            out->max_timestamp = r.max_timestamp;
            out->offset_of_max_timestamp = r.offset_of_max_timestamp;
            int joined = entries_join(&out->offset_entries, &out->offset_entries_count,
                                      r.offset_entries, r.offset_entries_count) == 0 &&
                         entries_join(&out->time_entries, &out->time_entries_count,
                                      r.time_entries, r.time_entries_count) == 0;
            shmb_drain_result_free(&r);
            if (!joined) { /* no memory for the entries: this round's are lost, so the */
                status = SHMB_DRAIN_WRITE_FAILED; /* process must not go on (see below) */
                out->write_errno = ENOMEM;
                out->truncated = 0;
                break;
            }
        }
        rounds++;
        int stop = r.frames == 0 || shmb_monotonic_ns() >= deadline; /* (a first round's) */
        for (Py_ssize_t i = 0; i < h->n; i++) {
            totals[i] += h->rings[i].count;
            stop |= h->rings[i].release_failed || h->rings[i].held_back;
        }
        if (stop || rounds >= sl->rounds_max)
            break;
        /* On from where this round left everything (as record_native_append would; the
         * indexes' room shrinks by every candidate, a bound: the time index keeps only new
         * maxima, and a round short of room declines to Python, which knows). */
        log->offset_entries_left -= (int64_t)r.offset_entries_count;
        log->time_entries_left -= (int64_t)r.time_entries_count;
        log->log_end_offset = r.log_end_offset;
        log->segment_size = r.segment_size;
        if (r.first_batch_set)
            log->first_batch_max_timestamp = r.first_batch_max_timestamp;
        log->bytes_since_entry = r.bytes_since_entry;
        log->max_timestamp = r.max_timestamp;
        log->offset_of_max_timestamp = r.offset_of_max_timestamp;
        shmb_drain_look looks[SHMB_REGISTRY_SLOTS_MAX];
        int bad = h->n > SHMB_REGISTRY_SLOTS_MAX;
        for (Py_ssize_t i = 0; i < h->n && !bad; i++) {
            shmb_drain_ring *g = &h->rings[i];
            g->expected_sequence += g->count;
            g->position = g->next_position;
            uint64_t capacity;
            bad = shmb_ring_check(g->region, g->region_len, &capacity, NULL) != SHMB_RING_OK;
            looks[i].region = g->region;
            looks[i].region_len = g->region_len;
            looks[i].position = g->position;
            looks[i].capacity = capacity;
        }
        if (bad)
            break; /* (positions moved: Python takes them from the result, as always) */
        /* No plain sleep inside the loop: one that every commit would end (dozing is off, or a
         * doze does not fit in what is left) is Python's to choose. A call that began with a
         * plain sleep dozes too after its first round (it was woken with work), as
         * PartitionOwner's next call would (an earlier version slept plainly here, woken by
         * every commit, until the budget ran out). */
        int64_t left_ms = (deadline - shmb_monotonic_ns()) / 1000000;
        if (left_ms < 1 || sl->loop_doze_ms <= 0 || left_ms <= sl->loop_doze_ms)
            break;
        int64_t next = shmb_drain_sleep_prepare(ctl, sl->registry_seen, looks, (size_t)h->n);
        if (next >= 0) {
            seen = (uint32_t)next;
            timeout_ms = left_ms;
            do_sleep = 1;
            continue;
        }
        shmb_u32_store_seq_cst(ctl + SHMB_CTL_PARTITION_SLEEPING_OFFSET, SHMB_PARTITION_AWAKE);
        if (next < -1 ||
            shmb_u32_load_seq_cst(ctl + SHMB_CTL_REGISTRY_CHANGES_OFFSET) !=
                (uint32_t)sl->registry_seen)
            break; /* a new ring or a caller error: Python looks */
        do_sleep = 0; /* a picked ring is readable: the next round at once */
    }
    /* The positions Python takes are the last round's; the counts, every round's. */
    for (Py_ssize_t i = 0; i < h->n && status == SHMB_DRAIN_DONE; i++)
        h->rings[i].count = (uint32_t)totals[i];
    sl->rounds = rounds;
    return status;
}

/* drain_round's body; with sl, the doorbell sleep first and the round only if it was woken
 * (or the doorbell had moved): both with the GIL released, without a return to Python in
 * between. The round then takes the wall clock afresh (its state was made before the sleep;
 * the caller passes a state whose other fields cannot change while the process sleeps). */
static PyObject *drain_round_run(PyObject *const *args, Py_ssize_t nargs, drain_sleep_args *sl)
{
    shmb_drain_log log;
    unsigned long long segment_size, segment_bytes, round_max, ring_round_max, start_time;
    memset(&log, 0, sizeof log);
    PyObject *rings_arg = args[0], *control_arg = args[1], *scratch_arg = args[2];
    if (!PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "drain_round: log must be a tuple (NativeAppendState)");
        return NULL;
    }
    if (drain_log_state(args[3], &log, &segment_size, &segment_bytes) < 0 ||
        drain_arg_u64(args[4], &round_max) < 0 || drain_arg_u64(args[5], &ring_round_max) < 0 ||
        drain_arg_int(args[6], &log.pid) < 0 || drain_arg_u64(args[7], &start_time) < 0 ||
        (nargs == 9 && drain_arg_int(args[8], &log.stop_after) < 0))
        return NULL;
    log.segment_size = segment_size;
    log.segment_bytes = segment_bytes;
    log.round_bytes_max = round_max;
    log.ring_round_bytes_max = ring_round_max;
    log.start_time = start_time;
    drain_hold h;
    Py_buffer control, scratch;
    if (drain_hold_init(&h, rings_arg) < 0) {
        drain_hold_free(&h);
        return NULL;
    }
    if (region_view(control_arg, 1, &control, "drain_round control") < 0) {
        drain_hold_free(&h);
        return NULL;
    }
    if (control.len < SHMB_CONTROL_REGISTRY_OFFSET ||
        PyObject_GetBuffer(scratch_arg, &scratch, PyBUF_WRITABLE) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "drain_round: not a control region");
        PyBuffer_Release(&control);
        drain_hold_free(&h);
        return NULL;
    }
    shmb_drain_result r;
    memset(&r, 0, sizeof r);
    int status = -1, clock_failed = 0;
    if (sl != NULL && sl->rounds_max > 1) {
        uint64_t *totals = PyMem_Calloc((size_t)(h.n > 0 ? h.n : 1), sizeof *totals);
        shmb_drain_ring *saved = PyMem_Calloc((size_t)(h.n > 0 ? h.n : 1), sizeof *saved);
        if (totals == NULL || saved == NULL) {
            PyMem_Free(totals);
            PyMem_Free(saved);
            PyErr_NoMemory();
            PyBuffer_Release(&scratch);
            PyBuffer_Release(&control);
            drain_hold_free(&h);
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS
        status = drain_loop(&h, control.buf, (size_t)control.len, scratch.buf,
                            (size_t)scratch.len, &log, sl, &r, totals, saved);
        Py_END_ALLOW_THREADS
        PyMem_Free(totals);
        PyMem_Free(saved);
        goto built;
    }
    Py_BEGIN_ALLOW_THREADS
    if (sl != NULL) {
        sl->status = shmb_drain_sleep(control.buf, sl->seen, sl->timeout_ms, sl->spin_ns,
                                      sl->doze_ms);
        if (sl->status != SHMB_WAIT_TIMEOUT && sl->status != SHMB_WAIT_INTERRUPTED)
            clock_failed = drain_wall_clock_ms(&log.now_ms) < 0;
    }
    if ((sl == NULL || (sl->status != SHMB_WAIT_TIMEOUT && sl->status != SHMB_WAIT_INTERRUPTED))
        && !clock_failed)
        status = shmb_drain_round(h.rings, (size_t)h.n, control.buf, (size_t)control.len,
                                  scratch.buf, (size_t)scratch.len, &log, &r);
    Py_END_ALLOW_THREADS
    if (sl != NULL)
        sl->rounds = status != -1; /* one round, or none (the sleep was not woken) */
built:;
    PyObject *result;
    if (status == -1)
        result = Py_NewRef(Py_None); /* slept without a wake-up: no round */
    else if (status == SHMB_DRAIN_DECLINED)
        result = Py_BuildValue("(ii)", status, r.decline);
    else if (status == SHMB_DRAIN_WRITE_FAILED)
        result = Py_BuildValue("(iiO)", status, r.write_errno, r.truncated ? Py_True : Py_False);
    else
        result = drain_done_result(&h, &r);
    if (status != -1)
        shmb_drain_result_free(&r);
    PyBuffer_Release(&scratch);
    PyBuffer_Release(&control);
    drain_hold_free(&h);
    return result;
}

/* Positional only (METH_FASTCALL: no keyword parsing per round). */
static PyObject *py_drain_round(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 && nargs != 9) {
        PyErr_Format(PyExc_TypeError, "drain_round takes 8 or 9 positional arguments (%zd given)",
                     nargs);
        return NULL;
    }
    return drain_round_run(args, nargs, NULL);
}

/* drain_sleep_round(seen, timeout_ms, spin_ns, rings, control, scratch, log, round_bytes_max,
 * ring_round_bytes_max, pid, start_time[, doze_ms[, loop]]) -> (WAIT_* status, drain_round's
 * result or None[, rounds]): the doorbell sleep (drain_sleep, whose prepare the caller has
 * done) and, once woken (or a doze ended with the doorbell moved), the round, in one call: a
 * wake-up runs no Python before the round publishes. loop = (rounds_max, budget_ms,
 * registry_seen, doze_ms): drain_loop's steady-state rounds after it, dozing doze_ms between. */
static PyObject *py_drain_sleep_round(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 11 || nargs > 13) {
        PyErr_Format(PyExc_TypeError, "drain_sleep_round takes 11 to 13 positional arguments "
                     "(%zd given)", nargs);
        return NULL;
    }
    unsigned long long seen = PyLong_AsUnsignedLongLong(args[0]);
    if (seen == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (seen > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "drain_sleep_round: seen is a u32 doorbell value");
        return NULL;
    }
    drain_sleep_args sl = {(uint32_t)seen, 0, 0, 0, SHMB_WAIT_TIMEOUT, 1, 0, -1, 0, 0};
    if (nargs >= 12 && tail_ll(args[11], &sl.doze_ms) < 0)
        return NULL;
    if (nargs == 13) {
        PyObject *loop = args[12];
        if (!PyTuple_Check(loop) || PyTuple_GET_SIZE(loop) != 4) {
            PyErr_SetString(PyExc_TypeError, "drain_sleep_round: loop is (rounds_max, "
                                             "budget_ms, registry_seen, doze_ms)");
            return NULL;
        }
        if (tail_ll(PyTuple_GET_ITEM(loop, 0), &sl.rounds_max) < 0 ||
            tail_ll(PyTuple_GET_ITEM(loop, 1), &sl.budget_ms) < 0 ||
            tail_ll(PyTuple_GET_ITEM(loop, 2), &sl.registry_seen) < 0 ||
            tail_ll(PyTuple_GET_ITEM(loop, 3), &sl.loop_doze_ms) < 0)
            return NULL;
    }
    sl.timeout_ms = PyLong_AsLongLong(args[1]);
    if (sl.timeout_ms == -1 && PyErr_Occurred())
        return NULL;
    sl.spin_ns = PyLong_AsLongLong(args[2]);
    if (sl.spin_ns == -1 && PyErr_Occurred())
        return NULL;
    PyObject *round = drain_round_run(args + 3, 8, &sl);
    if (round == NULL)
        return NULL;
    /* After rounds (drain_loop) their result must reach Python first: the handlers then run
     * at the interpreter's next check, right after this returns. */
    if (sl.status == SHMB_WAIT_INTERRUPTED && sl.rounds == 0 && PyErr_CheckSignals() < 0) {
        Py_DECREF(round);
        return NULL;
    }
    if (nargs == 13)
        return Py_BuildValue("(iNi)", sl.status, round, sl.rounds);
    return Py_BuildValue("(iN)", sl.status, round);
}

/* The partition loop's last look before it sleeps (PartitionOwner.wait_for_work):
 * shmb_drain_sleep_prepare over RingConsumer objects, whose buf, position and capacity are read
 * here. One call instead of ~12,000 instructions of Python per pass (perf/RESULTS.md). */
static PyObject *py_drain_sleep_prepare(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    static PyObject *s_buf, *s_position, *s_capacity;
    if (s_buf == NULL && ((s_buf = PyUnicode_InternFromString("buf")) == NULL ||
                          (s_position = PyUnicode_InternFromString("position")) == NULL ||
                          (s_capacity = PyUnicode_InternFromString("capacity")) == NULL)) {
        Py_CLEAR(s_buf);
        return NULL;
    }
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "drain_sleep_prepare(control, registry_seen, consumers)");
        return NULL;
    }
    long long registry_seen = PyLong_AsLongLong(args[1]);
    if (registry_seen == -1 && PyErr_Occurred())
        return NULL;
    PyObject *seq = PySequence_Fast(args[2], "drain_sleep_prepare: consumers must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    enum { ON_STACK = 8 };
    shmb_drain_look looks_stack[ON_STACK];
    Py_buffer views_stack[ON_STACK];
    shmb_drain_look *looks = looks_stack;
    Py_buffer *views = views_stack;
    Py_ssize_t held = 0;
    PyObject *result = NULL;
    Py_buffer control;
    int have_control = 0;
    if (n > ON_STACK) {
        looks = PyMem_Calloc((size_t)n, sizeof *looks);
        views = PyMem_Calloc((size_t)n, sizeof *views);
        if (looks == NULL || views == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* bounded by n */
        PyObject *c = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *buf = PyObject_GetAttr(c, s_buf);
        if (buf == NULL)
            goto done;
        int r = PyObject_GetBuffer(buf, &views[i], PyBUF_SIMPLE);
        Py_DECREF(buf);
        if (r < 0)
            goto done;
        held = i + 1;
        PyObject *pos = PyObject_GetAttr(c, s_position);
        if (pos == NULL)
            goto done;
        looks[i].position = PyLong_AsUnsignedLongLong(pos);
        Py_DECREF(pos);
        if (PyErr_Occurred())
            goto done;
        PyObject *cap = PyObject_GetAttr(c, s_capacity);
        if (cap == NULL)
            goto done;
        looks[i].capacity = PyLong_AsUnsignedLongLong(cap);
        Py_DECREF(cap);
        if (PyErr_Occurred())
            goto done;
        looks[i].region = views[i].buf;
        looks[i].region_len = (size_t)views[i].len;
    }
    if (region_view(args[0], 1, &control, "drain_sleep_prepare control") < 0)
        goto done;
    have_control = 1;
    if (control.len < SHMB_CONTROL_REGISTRY_OFFSET) {
        PyErr_SetString(PyExc_ValueError, "drain_sleep_prepare: not a control region");
        goto done;
    }
    int64_t seen = shmb_drain_sleep_prepare(control.buf, registry_seen, looks, (size_t)n);
    if (seen == -2)
        PyErr_SetString(PyExc_ValueError,
                        "drain_sleep_prepare: a consumer's position lies outside its ring");
    else
        result = PyLong_FromLongLong(seen);
done:
    if (have_control)
        PyBuffer_Release(&control);
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    if (looks != looks_stack)
        PyMem_Free(looks);
    if (views != views_stack)
        PyMem_Free(views);
    Py_DECREF(seq);
    return result;
}

/* drain_sleep(control, seen, timeout_ms, spin_ns): shmb_drain_sleep with the GIL released. */
static PyObject *py_drain_sleep(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "drain_sleep(control, seen, timeout_ms, spin_ns[, doze_ms])");
        return NULL;
    }
    long long doze_ms = 0;
    if (nargs == 5 && tail_ll(args[4], &doze_ms) < 0)
        return NULL;
    unsigned long long seen = PyLong_AsUnsignedLongLong(args[1]);
    if (seen == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    long long timeout_ms = PyLong_AsLongLong(args[2]);
    if (timeout_ms == -1 && PyErr_Occurred())
        return NULL;
    long long spin_ns = PyLong_AsLongLong(args[3]);
    if (spin_ns == -1 && PyErr_Occurred())
        return NULL;
    if (seen > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "drain_sleep: seen is a u32 doorbell value");
        return NULL;
    }
    Py_buffer control;
    if (region_view(args[0], 1, &control, "drain_sleep control") < 0)
        return NULL;
    if (control.len < SHMB_CONTROL_REGISTRY_OFFSET) {
        PyBuffer_Release(&control);
        PyErr_SetString(PyExc_ValueError, "drain_sleep: not a control region");
        return NULL;
    }
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = shmb_drain_sleep(control.buf, (uint32_t)seen, timeout_ms, spin_ns, doze_ms);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&control);
    if (r == SHMB_WAIT_INTERRUPTED && PyErr_CheckSignals() < 0)
        return NULL;
    return PyLong_FromLong(r);
}

static int add_drain_constants(PyObject *m)
{
#define DECLINE_NAME(name) #name,
    static const char *const names[] = {SHMB_DRAIN_DECLINE_NAMES(DECLINE_NAME)};
#undef DECLINE_NAME
    PyObject *t = PyTuple_New(SHMB_DRAIN_DECLINE_COUNT);
    if (t == NULL)
        return -1;
    for (int i = 0; i < SHMB_DRAIN_DECLINE_COUNT; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (s == NULL) {
            Py_DECREF(t);
            return -1;
        }
        PyTuple_SET_ITEM(t, i, s);
    }
    if (PyModule_AddObject(m, "DRAIN_DECLINE_REASONS", t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return (PyModule_AddIntConstant(m, "TAIL_RECORDS", TAIL_RECORDS) < 0 ||
            PyModule_AddIntConstant(m, "RING_POLL_COMMIT_ONLY_MS_MAX",
                                    RING_POLL_COMMIT_ONLY_MS_MAX) < 0 ||
            PyModule_AddIntConstant(m, "TAIL_NOTHING", TAIL_NOTHING) < 0 ||
            PyModule_AddIntConstant(m, "RING_TAKE_DECLINED", RING_TAKE_DECLINED) < 0 ||
            PyModule_AddIntConstant(m, "ACC_DOZE_WAKE_FRAMES", ACC_DOZE_WAKE_FRAMES) < 0 ||
            PyModule_AddIntConstant(m, "WALK_FOUND", SHMB_RB_WALK_FOUND) < 0 ||
            PyModule_AddIntConstant(m, "WALK_END", SHMB_RB_WALK_END) < 0 ||
            PyModule_AddIntConstant(m, "WALK_BAD_ENTRY", SHMB_RB_WALK_BAD_ENTRY) < 0 ||
            PyModule_AddIntConstant(m, "WALK_NOT_HEADER", SHMB_RB_WALK_NOT_HEADER) < 0 ||
            PyModule_AddIntConstant(m, "WALK_BAD_CHAIN", SHMB_RB_WALK_BAD_CHAIN) < 0 ||
            PyModule_AddIntConstant(m, "TAIL_DECLINED", TAIL_DECLINED) < 0 ||
            PyModule_AddIntConstant(m, "DRAIN_DONE", SHMB_DRAIN_DONE) < 0 ||
            PyModule_AddIntConstant(m, "DRAIN_DECLINED", SHMB_DRAIN_DECLINED) < 0 ||
            PyModule_AddIntConstant(m, "DRAIN_WRITE_FAILED", SHMB_DRAIN_WRITE_FAILED) < 0 ||
            PyModule_AddIntConstant(m, "DRAIN_STOP_AFTER_WRITE", SHMB_DRAIN_STOP_AFTER_WRITE) < 0 ||
            PyModule_AddIntConstant(m, "DRAIN_RING_FRAMES_MAX", SHMB_DRAIN_RING_FRAMES_MAX) < 0 ||
            PyModule_AddIntConstant(m, "DRAIN_STOP_AFTER_PUBLISH",
                                    SHMB_DRAIN_STOP_AFTER_PUBLISH) < 0 ||
            PyModule_AddIntConstant(m, "DRAIN_STOP_AFTER_COMPLETE",
                                    SHMB_DRAIN_STOP_AFTER_COMPLETE) < 0)
               ? -1
               : 0;
}

static PyObject *py_monotonic_ns(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(shmb_monotonic_ns());
}

/* time.monotonic_ns() // 1_000_000 and time.time_ns() // 1_000_000 (both clocks are what
 * CPython reads there), without a Python frame: the partition loop reads them every pass. */
static PyObject *py_monotonic_ms(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(shmb_monotonic_ns() / 1000000);
}

static PyObject *py_wall_clock_ms(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    int64_t ms;
    if (drain_wall_clock_ms(&ms) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLongLong(ms);
}

/* ==== module =============================================================================== */

static PyMethodDef module_methods[] = {
    {"crc32c", (PyCFunction)(void (*)(void))py_crc32c, METH_VARARGS | METH_KEYWORDS,
     "crc32c(data, crc=0) -> int\n\nCRC-32C (Castagnoli) of a bytes-like object, chained."},
    {"crc32c_table", (PyCFunction)(void (*)(void))py_crc32c_table, METH_VARARGS | METH_KEYWORDS,
     "crc32c_table(data, crc=0) -> int\n\nThe portable slice-by-8 path of crc32c."},
    {"crc32c_impl", py_crc32c_impl, METH_NOARGS,
     "crc32c_impl() -> str\n\n'vpclmulqdq-avx512', 'sse4.2' or 'table', chosen at import from "
     "CPUID."},
    {"crc32c_impls", py_crc32c_impls, METH_NOARGS,
     "crc32c_impls() -> tuple[str, ...]\n\nThe crc32c paths this CPU runs, fastest first."},
    {"crc32c_with", (PyCFunction)(void (*)(void))py_crc32c_with, METH_VARARGS | METH_KEYWORDS,
     "crc32c_with(name, data, crc=0) -> int\n\ncrc32c through the path called name (one of\n"
     "crc32c_impls()); ValueError if this CPU has no such path. For tests and benchmarks."},
    {"murmur2", py_murmur2, METH_O, "murmur2(key) -> int\n\nKafka's murmur2, signed int32."},
    {"partition_for_key", py_partition_for_key, METH_VARARGS,
     "partition_for_key(key, num_partitions) -> int\n\n(murmur2(key) & 0x7fffffff) % n."},
    {"scan_batches", (PyCFunction)(void (*)(void))py_scan_batches, METH_VARARGS | METH_KEYWORDS,
     "scan_batches(buf, verify_crc=True, verify_records=False, batch_bytes_max=0)\n"
     "-> (valid_bytes, status, error_position, [(position, base_offset, last_offset,\n"
     "    max_timestamp, records_count), ...])"},
    {"walk_batches", (PyCFunction)(void (*)(void))py_walk_batches, METH_FASTCALL,
     "walk_batches(buf, position, end, offset, expected_base, expected_last) -> (status, "
     "position, base, last, expected_base): the batch holding offset (LogReader._walk)"},
    {"resolve_inflight", (PyCFunction)(void (*)(void))py_resolve_inflight, METH_FASTCALL,
     "resolve_inflight(inflight, completions, batch_type) -> int\n\nProducer._resolve's "
     "common case: resolves the batches (popped from the left of the deque inflight) of each "
     "completion (first, last, base_offset, error_code) in turn; stops at a completion with an "
     "error code or a batch below its first (the reference handles those) and returns how many "
     "completions it handled. With budget: resolves at most that many batches and returns "
     "(handled, next_first, next_offset): when the budget ran out inside completion `handled`, "
     "its unresolved rest is (next_first, last, next_offset), else next_first is -1."},
    {"poll_ring", (PyCFunction)(void (*)(void))py_poll_ring, METH_FASTCALL,
     "poll_ring(order, timeout_ms, max_records, read_rings, spin_ns, counting, counters_due,\n"
     "          counters_next_ns, records_max) -> None | list | tuple\n\n"
     "Consumer.poll's one-partition ring read in one call (see native/src/module.c): None\n"
     "when it did nothing, the records, or ring_take's result + the wait's start (ns)."},
    {"ring_take", (PyCFunction)(void (*)(void))py_ring_take, METH_FASTCALL,
     "ring_take(control, rings, hints, hint_froms, offset, registry_seen, records_max, topic, "
     "partition, wait_ms, spin_ns, seen_hw_seq) -> (status, records, at, end, seen_commit, "
     "beyond): RingReads.take in one call"},
    {"ring_frame_at", (PyCFunction)(void (*)(void))py_ring_frame_at, METH_FASTCALL,
     "ring_frame_at(ring, control, offset, hint, batch_bytes_max, records_max)\n"
     "-> (FRAME_AT_* status, payload bytes or None, base, span, next_hint)\n\n"
     "A consumer's read of the committed frame of one producer ring whose offsets hold\n"
     "offset (decision 0005 step 5): a checked copy on FRAME_AT_FOUND. hint: where to start\n"
     "walking (a next_hint of an earlier call, or 0). Never writes to the ring."},
    {"tail_read", (PyCFunction)(void (*)(void))py_tail_read, METH_FASTCALL,
     "tail_read(control, segment_map, segment_base, offset, position, checked_end, fd,\n"
     "          max_bytes, verify_crc, topic, partition[, wait_ms, spin_ns[, hint_offset]])\n"
     "-> (TAIL_RECORDS, hw_seq, hw, records, next_position, next_offset, checked_end, nbytes)\n"
     "   | (TAIL_NOTHING, hw_seq, hw, None, ...) | (TAIL_DECLINED, None, ...): 8 items\n\n"
     "A caught-up consumer's read of the active segment from its hint, in one call; declines\n"
     "anything else (the caller then reads with log/reader.py, the reference). With wait_ms\n"
     "> 0 and nothing new, it first sleeps (GIL released) until the partition publishes or\n"
     "wait_ms pass (spinning spin_ns first), then reads once more; TAIL_NOTHING on a timeout\n"
     "or a signal (whose handler has run). hint_offset (default offset): the base offset of\n"
     "the batch at position; below offset, it walks batch headers on to offset's batch."},
    {"decode_records", (PyCFunction)(void (*)(void))py_decode_records,
     METH_VARARGS | METH_KEYWORDS,
     "decode_records(buf, verify_crc=True, topic=None, partition=-1) -> list[Record]"},
    {"decode_columnar_into", (PyCFunction)(void (*)(void))py_decode_columnar_into,
     METH_VARARGS | METH_KEYWORDS,
     "decode_columnar_into(buf, offsets, timestamps, key_starts, key_lengths, value_starts,\n"
     "                     value_lengths, verify_crc=True) -> int"},
    {"encode_batch", (PyCFunction)(void (*)(void))py_encode_batch, METH_VARARGS | METH_KEYWORDS,
     "encode_batch(values, keys=None, headers=None, timestamps=None, timestamp=0,\n"
     "             base_offset=0, partition_leader_epoch=-1, producer_id=-1,\n"
     "             producer_epoch=-1, base_sequence=-1, attributes=0) -> bytes"},
    {"atomic_load_u32", py_atomic_load_u32, METH_VARARGS,
     "atomic_load_u32(buf, offset) -> int\n\nSequentially consistent load of a u32."},
    {"frame_ok", py_frame_ok, METH_VARARGS,
     "frame_ok(payload, batch_bytes_max, records_max) -> bool: the partition's rule for a\n"
     "ring frame, which consumers reading rings apply too (decision 0005)."},
    {"frame_offsets", py_frame_offsets, METH_O,
     "frame_offsets(buffer) -> offsets a ring frame's payload takes (decision 0005)."},
    {"atomic_load_u64", py_atomic_load_u64, METH_VARARGS,
     "atomic_load_u64(buf, offset) -> int\n\nSequentially consistent load of a u64."},
    {"atomic_store_u32", py_atomic_store_u32, METH_VARARGS,
     "atomic_store_u32(buf, offset, value)\n\nSequentially consistent (release and more) store."},
    {"atomic_store_u64", py_atomic_store_u64, METH_VARARGS,
     "atomic_store_u64(buf, offset, value)\n\nSequentially consistent (release and more) store."},
    {"atomic_cas_u32", py_atomic_cas_u32, METH_VARARGS,
     "atomic_cas_u32(buf, offset, expected, desired) -> bool"},
    {"atomic_cas_u64", py_atomic_cas_u64, METH_VARARGS,
     "atomic_cas_u64(buf, offset, expected, desired) -> bool"},
    {"atomic_add_u32", py_atomic_add_u32, METH_VARARGS,
     "atomic_add_u32(buf, offset, delta) -> old value (wraps modulo 2**32)"},
    {"atomic_add_u64", py_atomic_add_u64, METH_VARARGS,
     "atomic_add_u64(buf, offset, delta) -> old value (wraps modulo 2**64)"},
    {"atomic_store_u64_many", (PyCFunction)(void (*)(void))py_atomic_store_u64_many,
     METH_FASTCALL,
     "atomic_store_u64_many(buf, offset, values)\n\nRelaxed atomic store of each value into "
     "consecutive u64 words from offset (counters: one writer, readers load)."},
    {"atomic_load_u64_many", (PyCFunction)(void (*)(void))py_atomic_load_u64_many,
     METH_FASTCALL,
     "atomic_load_u64_many(buf, offset, count) -> tuple\n\nRelaxed atomic load of count "
     "consecutive u64 words from offset."},
    {"futex_wait", (PyCFunction)(void (*)(void))py_futex_wait, METH_VARARGS | METH_KEYWORDS,
     "futex_wait(buf, offset, expected, timeout_ms=-1, spin_ns=0) -> WAIT_* status\n\n"
     "Shared (not private) FUTEX_WAIT on a u32 of a writable mapping; the GIL is released."},
    {"futex_waitv", (PyCFunction)(void (*)(void))py_futex_waitv, METH_VARARGS | METH_KEYWORDS,
     "futex_waitv(words, timeout_ms=-1, spin_ns=0) -> (WAIT_* status, index) or None\n\n"
     "One sleep on many shared u32 words [(buf, offset, expected), ...] (Linux 5.16+); None\n"
     "when the kernel has no futex_waitv. The GIL is released."},
    {"futex_wake", py_futex_wake, METH_VARARGS,
     "futex_wake(buf, offset, count=INT_MAX) -> number woken"},
    {"monotonic_ns", py_monotonic_ns, METH_NOARGS, "monotonic_ns() -> CLOCK_MONOTONIC in ns"},
    {"monotonic_ms", py_monotonic_ms, METH_NOARGS,
     "monotonic_ms() -> time.monotonic_ns() // 1_000_000"},
    {"wall_clock_ms", py_wall_clock_ms, METH_NOARGS,
     "wall_clock_ms() -> time.time_ns() // 1_000_000 (CLOCK_REALTIME)"},
    {"ring_check", py_ring_check, METH_O,
     "ring_check(ring) -> capacity; RingCorruptError when the header is bad"},
    {"ring_write", (PyCFunction)(void (*)(void))py_ring_write, METH_VARARGS | METH_KEYWORDS,
     "ring_write(ring, payloads, doorbell=None, die_before_commit=False)\n"
     "-> (status, first_sequence, written)\n\n"
     "status RING_OK or RING_FULL (only `written` of the payloads went in), RING_OFFSETS_UNSET.\n"
     "doorbell: the partition's control region: the frames' offsets are taken from its\n"
     "next_offset at the commit (decision 0005), and the partition is woken.\n"
     "die_before_commit (tests only): SIGKILL this process between reservation and commit."},
    {"ring_read", (PyCFunction)(void (*)(void))py_ring_read, METH_VARARGS | METH_KEYWORDS,
     "ring_read(ring, position, expected_sequence, max_bytes=1MiB, frames_max=65536)\n"
     "-> (next_position, count, payloads_concatenated: bytes)"},
    {"ring_scan", (PyCFunction)(void (*)(void))py_ring_scan, METH_VARARGS | METH_KEYWORDS,
     "ring_scan(ring, position, expected_sequence, max_bytes=1MiB, frames_max=65536)\n"
     "-> (next_position, [(payload_offset_in_region, payload_bytes), ...])"},
    {"ring_release", py_ring_release, METH_VARARGS,
     "ring_release(ring, position): free the ring up to position; wake a waiting producer"},
    {"ring_fits", py_ring_fits, METH_VARARGS,
     "ring_fits(ring, payload_bytes) -> bool"},
    {"rings_wait_quiet", py_rings_wait_quiet, METH_VARARGS,
     "rings_wait_quiet(rings, quiet_us, timeout_ms, poke) -> int\n\n"
     "Producer's sender: naps (GIL released) until a ring is idle and was not written for\n"
     "quiet_us; its index, -1 on timeout, -2 when poke[0] became non-zero."},
    {"ring_wait_space", (PyCFunction)(void (*)(void))py_ring_wait_space,
     METH_VARARGS | METH_KEYWORDS,
     "ring_wait_space(ring, payload_bytes, timeout_ms=-1, spin_ns=0) -> bool\n\n"
     "True when the payload fits; False on timeout or when woken without room (a nudge)."},
    {"doorbell_ring", py_doorbell_ring, METH_O,
     "doorbell_ring(control): wake the partition process if it sleeps (not if it dozes)"},
    {"doorbell_ring_urgent", py_doorbell_ring_urgent, METH_O,
     "doorbell_ring_urgent(control): wake the partition process if it sleeps or dozes (a\n"
     "client about to wait on it: an ack, ring space)"},
    {"hw_waiter", py_hw_waiter, METH_VARARGS,
     "hw_waiter(control, enter): a consumer around its sleep on hw_seq: enter counts it in\n"
     "hw_waiters and wakes a dozing partition process; leave (False) uncounts it"},
    {"drain_sleep_prepare", (PyCFunction)(void (*)(void))py_drain_sleep_prepare, METH_FASTCALL,
     "drain_sleep_prepare(control, registry_seen, consumers) -> int\n\n"
     "PartitionOwner.wait_for_work's look before it sleeps (shmb/drain.h): loads the doorbell,\n"
     "raises partition_sleeping, then returns -1 if registry_changes != registry_seen (-1:\n"
     "never scanned) or a consumer's ring is readable (a committed frame at its position and\n"
     "fewer than COMPLETIONS_MAX completions unread), else the doorbell value to sleep on.\n"
     "consumers: RingConsumer objects (buf, position, capacity are read)."},
    {"drain_sleep_round", (PyCFunction)(void (*)(void))py_drain_sleep_round, METH_FASTCALL,
     "drain_sleep_round(seen, timeout_ms, spin_ns, rings, control, scratch, log,\n"
     "                  round_bytes_max, ring_round_bytes_max, pid, start_time[, doze_ms[,\n"
     "                  (rounds_max, budget_ms, registry_seen, doze_ms)]])\n"
     "-> (WAIT_* status, drain_round's result, or None when the sleep was not woken\n"
     "    [, rounds run])\n\n"
     "drain_sleep, then (woken or the doorbell moved) drain_round with the clock read afresh,\n"
     "in one call with the GIL released. With the loop tuple and rounds_max > 1: doze and\n"
     "round again, from the state the last round left, while each round appended and left\n"
     "nothing for Python, up to rounds_max rounds or budget_ms; the result is the rounds' sum."},
    {"drain_sleep", (PyCFunction)(void (*)(void))py_drain_sleep, METH_FASTCALL,
     "drain_sleep(control, seen, timeout_ms, spin_ns[, doze_ms]) -> WAIT_* status\n\n"
     "After drain_sleep_prepare returned seen: FUTEX_WAIT on the doorbell (GIL released), then\n"
     "partition_sleeping is lowered, whatever ended the wait. doze_ms > 0: a doze (DOZING:\n"
     "producers' commits do not wake it) unless a consumer waits for the high watermark; one\n"
     "that ends with the doorbell moved returns WAIT_CHANGED."},
    {"drain_round", (PyCFunction)(void (*)(void))py_drain_round, METH_FASTCALL,
     "drain_round(rings, control, scratch, log, round_bytes_max, ring_round_bytes_max, pid,\n"
     "            start_time, stop_after=0)  (positional only)\n"
     "-> (DRAIN_DONE, ((next_position, count, base_offset, release_error), ...), appended)\n"
     "   | (DRAIN_DECLINED, reason) | (DRAIN_WRITE_FAILED, errno, truncated)\n\n"
     "One drain round in C, GIL released (shmb/drain.h). rings: (region, position,\n"
     "expected_sequence) in round-robin order; log: PartitionLog.native_append_state().\n"
     "appended is None when no frame was taken, else (frames, records, batches, bytes,\n"
     "log_end_offset, segment_size, first_batch_max_timestamp, bytes_since_entry,\n"
     "max_timestamp, offset_of_max_timestamp, offset_entries, time_entries)."},
    {NULL, NULL, 0, NULL},
};

static int module_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = get_state(m);
    if (st == NULL)
        return 0;
    Py_VISIT(st->record_type);
    Py_VISIT(st->file_map_type);
    Py_VISIT(st->accumulator_type);
    Py_VISIT(st->mutex_type);
    Py_VISIT(st->future_base_type);
    Py_VISIT(st->empty_tuple);
    for (int i = 0; i < STATUS_COUNT; i++)
        Py_VISIT(st->errors[i]);
    Py_VISIT(st->ring_corrupt_error);
    Py_VISIT(st->slots_type);
    Py_VISIT(st->fetch_type);
    Py_VISIT(st->rings_type);
    return 0;
}

static int module_clear(PyObject *m)
{
    module_state *st = get_state(m);
    if (st == NULL)
        return 0;
    Py_CLEAR(st->record_type);
    Py_CLEAR(st->file_map_type);
    Py_CLEAR(st->accumulator_type);
    Py_CLEAR(st->mutex_type);
    Py_CLEAR(st->future_base_type);
    Py_CLEAR(st->empty_tuple);
    for (int i = 0; i < STATUS_COUNT; i++)
        Py_CLEAR(st->errors[i]);
    Py_CLEAR(st->ring_corrupt_error);
    Py_CLEAR(st->slots_type);
    Py_CLEAR(st->fetch_type);
    Py_CLEAR(st->rings_type);
    Py_CLEAR(st->buf_name);
    return 0;
}

static void module_free(void *m) { module_clear((PyObject *)m); }

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmbroker._native",
    .m_doc = "The C core of shmbroker: CRC-32C, murmur2, RecordBatch v2 encode/decode/scan.\n"
             "Contract: docs/design/records.md.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

static int add_layout(PyObject *m)
{
    static const struct {
        const char *name;
        long value;
    } entries[] = {
        {"base_offset_offset", SHMB_RB_BASE_OFFSET_OFFSET},
        {"batch_length_offset", SHMB_RB_BATCH_LENGTH_OFFSET},
        {"partition_leader_epoch_offset", SHMB_RB_PARTITION_LEADER_EPOCH_OFFSET},
        {"magic_offset", SHMB_RB_MAGIC_OFFSET},
        {"crc_offset", SHMB_RB_CRC_OFFSET},
        {"attributes_offset", SHMB_RB_ATTRIBUTES_OFFSET},
        {"last_offset_delta_offset", SHMB_RB_LAST_OFFSET_DELTA_OFFSET},
        {"base_timestamp_offset", SHMB_RB_BASE_TIMESTAMP_OFFSET},
        {"max_timestamp_offset", SHMB_RB_MAX_TIMESTAMP_OFFSET},
        {"producer_id_offset", SHMB_RB_PRODUCER_ID_OFFSET},
        {"producer_epoch_offset", SHMB_RB_PRODUCER_EPOCH_OFFSET},
        {"base_sequence_offset", SHMB_RB_BASE_SEQUENCE_OFFSET},
        {"records_count_offset", SHMB_RB_RECORDS_COUNT_OFFSET},
        {"HEADER_SIZE", SHMB_RB_HEADER_SIZE},
        {"LOG_OVERHEAD", SHMB_RB_LOG_OVERHEAD},
        {"CRC_START", SHMB_RB_CRC_START},
        {"MAGIC", SHMB_RB_MAGIC},
        {"BATCH_LENGTH_MIN", SHMB_RB_BATCH_LENGTH_MIN},
        {"COMPRESSION_MASK", SHMB_RB_COMPRESSION_MASK},
        {"COMPRESSION_CODEC_MAX", SHMB_RB_COMPRESSION_CODEC_MAX},
        {"COMPRESSED_RECORDS_MAX", SHMB_RB_COMPRESSED_RECORDS_MAX},
        {"TIMESTAMP_TYPE_MASK", SHMB_RB_TIMESTAMP_TYPE_MASK},
        {"TRANSACTIONAL_MASK", SHMB_RB_TRANSACTIONAL_MASK},
        {"CONTROL_MASK", SHMB_RB_CONTROL_MASK},
        {"SCAN_OK", SHMB_RB_SCAN_OK},
        {"SCAN_TRUNCATED", SHMB_RB_SCAN_TRUNCATED},
        {"SCAN_BAD_LENGTH", SHMB_RB_SCAN_BAD_LENGTH},
        {"SCAN_BAD_MAGIC", SHMB_RB_SCAN_BAD_MAGIC},
        {"SCAN_BAD_CRC", SHMB_RB_SCAN_BAD_CRC},
        {"SCAN_BAD_RECORD", SHMB_RB_SCAN_BAD_RECORD},
        {"SCAN_COMPRESSED", SHMB_RB_SCAN_COMPRESSED},
        {"SCAN_TOO_LARGE", SHMB_RB_SCAN_TOO_LARGE},
    };
    PyObject *d = PyDict_New();
    if (d == NULL)
        return -1;
    for (size_t i = 0; i < sizeof entries / sizeof entries[0]; i++) {
        PyObject *v = PyLong_FromLong(entries[i].value);
        if (v == NULL || PyDict_SetItemString(d, entries[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return -1;
        }
        Py_DECREF(v);
    }
    return PyModule_AddObject(m, "LAYOUT", d) < 0 ? (Py_DECREF(d), -1) : 0;
}

/* SHM_LAYOUT: the shared-memory numbers this build was compiled with (drift test). */
static int add_shm_layout(PyObject *m)
{
    static const struct {
        const char *name;
        unsigned long long value;
    } entries[] = {
#define SHMB_ENTRY(name, value) {name, (unsigned long long)(value)},
        SHMB_SHM_LAYOUT_TABLE(SHMB_ENTRY)
#undef SHMB_ENTRY
    };
    PyObject *d = PyDict_New();
    if (d == NULL)
        return -1;
    for (size_t i = 0; i < sizeof entries / sizeof entries[0]; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(entries[i].value);
        if (v == NULL || PyDict_SetItemString(d, entries[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return -1;
        }
        Py_DECREF(v);
    }
    return PyModule_AddObject(m, "SHM_LAYOUT", d) < 0 ? (Py_DECREF(d), -1) : 0;
}

static int init_state(PyObject *m, module_state *st)
{
    static const char *const names[STATUS_COUNT] = {
        [SHMB_RB_SCAN_TRUNCATED] = "TruncatedBatchError",
        [SHMB_RB_SCAN_BAD_LENGTH] = "CorruptRecordError",
        [SHMB_RB_SCAN_BAD_MAGIC] = "InvalidMagicError",
        [SHMB_RB_SCAN_BAD_CRC] = "CrcMismatchError",
        [SHMB_RB_SCAN_BAD_RECORD] = "InvalidRecordError",
        [SHMB_RB_SCAN_COMPRESSED] = "UnsupportedCompressionError",
        [SHMB_RB_SCAN_TOO_LARGE] = "RecordTooLargeError",
    };
    PyObject *errors = PyImport_ImportModule("shmbroker.errors");
    if (errors == NULL)
        return -1;
    for (int i = 1; i < STATUS_COUNT; i++) {
        st->errors[i] = PyObject_GetAttrString(errors, names[i]);
        if (st->errors[i] == NULL) {
            Py_DECREF(errors);
            return -1;
        }
    }
    st->ring_corrupt_error = PyObject_GetAttrString(errors, "RingCorruptError");
    Py_DECREF(errors);
    if (st->ring_corrupt_error == NULL)
        return -1;
    st->empty_tuple = PyTuple_New(0);
    if (st->empty_tuple == NULL)
        return -1;
    st->record_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Record_spec, NULL);
    if (st->record_type == NULL)
        return -1;
    Py_INCREF(st->record_type);
    if (PyModule_AddObject(m, "Record", (PyObject *)st->record_type) < 0) {
        Py_DECREF(st->record_type);
        return -1;
    }
    st->file_map_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &FileMap_spec, NULL);
    if (st->file_map_type == NULL)
        return -1;
    Py_INCREF(st->file_map_type);
    if (PyModule_AddObject(m, "FileMap", (PyObject *)st->file_map_type) < 0) {
        Py_DECREF(st->file_map_type);
        return -1;
    }
    st->future_base_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &FutureBase_spec, NULL);
    if (st->future_base_type == NULL)
        return -1;
    Py_INCREF(st->future_base_type);
    if (PyModule_AddObject(m, "FutureBase", (PyObject *)st->future_base_type) < 0) {
        Py_DECREF(st->future_base_type);
        return -1;
    }
    st->mutex_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Mutex_spec, NULL);
    if (st->mutex_type == NULL)
        return -1;
    Py_INCREF(st->mutex_type);
    if (PyModule_AddObject(m, "Mutex", (PyObject *)st->mutex_type) < 0) {
        Py_DECREF(st->mutex_type);
        return -1;
    }
    st->accumulator_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Accumulator_spec, NULL);
    if (st->accumulator_type == NULL)
        return -1;
    Py_INCREF(st->accumulator_type);
    if (PyModule_AddObject(m, "RecordAccumulator", (PyObject *)st->accumulator_type) < 0) {
        Py_DECREF(st->accumulator_type);
        return -1;
    }
    /* The module keeps no reference of its own to these two: only Producer uses them. */
    PyObject *t = PyType_FromModuleAndSpec(m, &SendPath_spec, NULL);
    if (t == NULL || PyModule_AddObject(m, "SendPath", t) < 0) {
        Py_XDECREF(t);
        return -1;
    }
    t = PyType_FromModuleAndSpec(m, &SendMethod_spec, NULL);
    if (t == NULL || PyModule_AddObject(m, "SendMethod", t) < 0) {
        Py_XDECREF(t);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__native(void)
{
    shmb_crc32c_init();
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    if (init_state(m, get_state(m)) < 0 || add_layout(m) < 0 || add_shm_layout(m) < 0 || add_drain_constants(m) < 0 ||
        PyModule_AddIntConstant(m, "QUIET_RINGS_MAX", SHMB_QUIET_RINGS_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
