/*
 * udm_fileops: what Node's fs lacks for sparse files and block devices.
 *
 *   seekData(fd, offset)  -> lseek(SEEK_DATA), -1 when there is no data at or after offset (ENXIO)
 *   seekHole(fd, offset)  -> lseek(SEEK_HOLE), -1 when offset is at or past EOF (ENXIO)
 *   punchHole(fd, offset, length) -> Promise: fallocate(PUNCH_HOLE|KEEP_SIZE), BLKDISCARD on block devices
 *   zeroRange(fd, offset, length) -> Promise: fallocate(ZERO_RANGE|KEEP_SIZE) (PUNCH_HOLE where the
 *                                    file system lacks it), BLKZEROOUT on block devices
 *   copyRange(fdIn, offIn, fdOut, offOut, length) -> Promise<bytes copied>: copy_file_range, in the
 *                                    kernel (no copy through user memory; reflinks where supported)
 *   preadNowait(fd, target, position) -> bytes read from the page cache only (preadv2 RWF_NOWAIT),
 *                                    -1 when none of it is cached (EAGAIN), 0 at end of file
 *   dropCache(fd, offset, length) -> posix_fadvise(DONTNEED): clean cached pages of the range dropped
 *   ofdLock(fd, start, length, type) -> fcntl(F_OFD_SETLK): type "read", "write" or "unlock" on the
 *                                    byte range; throws EAGAIN when another open file holds a
 *                                    conflicting lock (qemu's image locks are OFD read locks)
 *   ofdTest(fd, start, length, type) -> fcntl(F_OFD_GETLK): null when a lock of `type` could be
 *                                    taken, else the first conflicting lock {type, start, length, pid}
 *                                    (pid is -1 for an OFD lock, the owner's pid for a POSIX lock)
 *   notifySocket(path, message) -> one datagram on a Unix datagram socket (sd_notify: Node's dgram
 *                                    module has no Unix sockets); "@name" is an abstract socket
 *
 * The two seeks, preadNowait (it never waits for the disk: it
 * copies what the page cache holds, or fails with EAGAIN) and dropCache run synchronously; punching and zeroing can take
 * long (a 1 GiB BLKZEROOUT writes 1 GiB) and run on the libuv thread pool via napi async work.
 * Errors reject/throw an Error with `code` set to the errno name (e.g. "EOPNOTSUPP") and `errno`.
 */
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <node_api.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/uio.h>
#include <unistd.h>

#define CHECK(call)                                                                   \
  do {                                                                                \
    if ((call) != napi_ok) {                                                          \
      napi_throw_error(env, NULL, "udm_fileops: N-API call failed: " #call);          \
      return NULL;                                                                    \
    }                                                                                 \
  } while (0)

static const char *errno_code(int err) {
  switch (err) {
    case EBADF: return "EBADF";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    case ENOSPC: return "ENOSPC";
    case ENODEV: return "ENODEV";
    case ENXIO: return "ENXIO";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case EROFS: return "EROFS";
    case EFBIG: return "EFBIG";
    case EINTR: return "EINTR";
    case ESPIPE: return "ESPIPE";
    case ETXTBSY: return "ETXTBSY";
    case EXDEV: return "EXDEV";
    case ENOSYS: return "ENOSYS";
    case EISDIR: return "EISDIR";
    case ENOTTY: return "ENOTTY";
    case EAGAIN: return "EAGAIN";
    case EFAULT: return "EFAULT";
    case ENOLCK: return "ENOLCK";
    case EDEADLK: return "EDEADLK";
    case ENOENT: return "ENOENT";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    default: return "EIO";
  }
}

static napi_value make_errno_error(napi_env env, const char *syscall, int err) {
  char text[160];
  const char *code = errno_code(err);
  napi_value msg, code_value, error, errno_value, syscall_value;
  snprintf(text, sizeof text, "%s: %s (%s)", syscall, strerror(err), code);
  if (napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg) != napi_ok) return NULL;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_value) != napi_ok) return NULL;
  if (napi_create_error(env, code_value, msg, &error) != napi_ok) return NULL;
  if (napi_create_int32(env, -err, &errno_value) == napi_ok)
    napi_set_named_property(env, error, "errno", errno_value);
  if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_value) == napi_ok)
    napi_set_named_property(env, error, "syscall", syscall_value);
  return error;
}

/* Reads argument i as a non-negative integer that fits an off_t (JS numbers are exact to 2^53). */
static int get_offset(napi_env env, napi_value *argv, size_t i, const char *what, int64_t *out) {
  double value;
  if (napi_get_value_double(env, argv[i], &value) != napi_ok || value != value || value < 0 ||
      value > 9007199254740991.0 || value != (double)(int64_t)value) {
    char text[96];
    snprintf(text, sizeof text, "udm_fileops: %s must be a non-negative safe integer", what);
    napi_throw_type_error(env, "EINVAL", text);
    return 0;
  }
  *out = (int64_t)value;
  return 1;
}

static int get_fd(napi_env env, napi_value *argv, int *fd) {
  int64_t value;
  if (!get_offset(env, argv, 0, "fd", &value)) return 0;
  if (value > INT32_MAX) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: fd out of range");
    return 0;
  }
  *fd = (int)value;
  return 1;
}

static napi_value do_seek(napi_env env, napi_callback_info info, int whence, const char *syscall) {
  size_t argc = 2;
  napi_value argv[2], result;
  int fd;
  int64_t offset;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: expected (fd, offset)");
    return NULL;
  }
  if (!get_fd(env, argv, &fd) || !get_offset(env, argv, 1, "offset", &offset)) return NULL;
  off_t pos = lseek(fd, (off_t)offset, whence);
  if (pos < 0) {
    if (errno != ENXIO) {
      napi_throw(env, make_errno_error(env, syscall, errno));
      return NULL;
    }
    pos = -1;
  }
  CHECK(napi_create_double(env, (double)pos, &result));
  return result;
}

static napi_value seek_data(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_DATA, "lseek(SEEK_DATA)");
}

static napi_value seek_hole(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_HOLE, "lseek(SEEK_HOLE)");
}

enum range_op { OP_PUNCH, OP_ZERO };

/*
 * Runs `w` on the thread pool and returns the promise its complete callback settles. On failure
 * frees `w`, throws and returns NULL.
 */
static napi_value queue_promise_work(napi_env env, const char *name, napi_async_execute_callback execute,
                                     napi_async_complete_callback complete, void *w, napi_async_work *work,
                                     napi_deferred *deferred) {
  napi_value promise, resource_name;
  if (napi_create_promise(env, deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name) != napi_ok ||
      napi_create_async_work(env, NULL, resource_name, execute, complete, w, work) != napi_ok) {
    free(w);
    napi_throw_error(env, NULL, "udm_fileops: could not start async work");
    return NULL;
  }
  if (napi_queue_async_work(env, *work) != napi_ok) {
    napi_delete_async_work(env, *work);
    free(w);
    napi_throw_error(env, NULL, "udm_fileops: could not queue async work");
    return NULL;
  }
  return promise;
}

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  enum range_op op;
  int fd;
  int64_t offset;
  int64_t length;
  int err;
  const char *syscall;
} range_work;

static void range_execute(napi_env env, void *data) {
  (void)env;
  range_work *w = data;
  struct stat st;
  w->err = 0;
  if (fstat(w->fd, &st) < 0) {
    w->err = errno;
    w->syscall = "fstat";
    return;
  }
  if (S_ISBLK(st.st_mode)) {
    uint64_t range[2] = {(uint64_t)w->offset, (uint64_t)w->length};
    unsigned long request = w->op == OP_PUNCH ? BLKDISCARD : BLKZEROOUT;
    w->syscall = w->op == OP_PUNCH ? "ioctl(BLKDISCARD)" : "ioctl(BLKZEROOUT)";
    int rc;
    do rc = ioctl(w->fd, request, range);
    while (rc < 0 && errno == EINTR);
    if (rc < 0) w->err = errno;
    return;
  }
  int mode = FALLOC_FL_KEEP_SIZE | (w->op == OP_PUNCH ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE);
  w->syscall = w->op == OP_PUNCH ? "fallocate(PUNCH_HOLE)" : "fallocate(ZERO_RANGE)";
  int rc;
  do rc = fallocate(w->fd, mode, (off_t)w->offset, (off_t)w->length);
  while (rc < 0 && errno == EINTR);
  if (rc < 0 && w->op == OP_ZERO && errno == EOPNOTSUPP) {
    /* tmpfs and some others punch but cannot zero-range; a punched hole reads as zeros too. */
    w->syscall = "fallocate(PUNCH_HOLE)";
    do rc = fallocate(w->fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, (off_t)w->offset, (off_t)w->length);
    while (rc < 0 && errno == EINTR);
  }
  if (rc < 0) w->err = errno;
}

static void range_complete(napi_env env, napi_status status, void *data) {
  range_work *w = data;
  if (status != napi_ok) {
    napi_value msg, error;
    napi_create_string_utf8(env, "udm_fileops: async work was cancelled", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &error);
    napi_reject_deferred(env, w->deferred, error);
  } else if (w->err) {
    napi_reject_deferred(env, w->deferred, make_errno_error(env, w->syscall, w->err));
  } else {
    napi_value undefined;
    napi_get_undefined(env, &undefined);
    napi_resolve_deferred(env, w->deferred, undefined);
  }
  napi_delete_async_work(env, w->work);
  free(w);
}

static napi_value start_range(napi_env env, napi_callback_info info, enum range_op op, const char *name) {
  size_t argc = 3;
  napi_value argv[3];
  int fd;
  int64_t offset, length;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: expected (fd, offset, length)");
    return NULL;
  }
  if (!get_fd(env, argv, &fd) || !get_offset(env, argv, 1, "offset", &offset) ||
      !get_offset(env, argv, 2, "length", &length))
    return NULL;
  range_work *w = calloc(1, sizeof *w);
  if (!w) {
    napi_throw_error(env, "ENOMEM", "udm_fileops: out of memory");
    return NULL;
  }
  w->op = op;
  w->fd = fd;
  w->offset = offset;
  w->length = length;
  return queue_promise_work(env, name, range_execute, range_complete, w, &w->work, &w->deferred);
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  return start_range(env, info, OP_PUNCH, "udm_fileops.punchHole");
}

static napi_value zero_range(napi_env env, napi_callback_info info) {
  return start_range(env, info, OP_ZERO, "udm_fileops.zeroRange");
}

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int fd_in;
  int fd_out;
  int64_t off_in;
  int64_t off_out;
  int64_t length;
  int64_t done;
  int err;
} copy_work;

static void copy_execute(napi_env env, void *data) {
  (void)env;
  copy_work *w = data;
  loff_t in = (loff_t)w->off_in;
  loff_t out = (loff_t)w->off_out;
  w->done = 0;
  w->err = 0;
  while (w->done < w->length) {
    ssize_t n = copy_file_range(w->fd_in, &in, w->fd_out, &out, (size_t)(w->length - w->done), 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      w->err = errno;
      return;
    }
    if (n == 0) return; /* end of the source file */
    w->done += n;
  }
}

static void copy_complete(napi_env env, napi_status status, void *data) {
  copy_work *w = data;
  if (status != napi_ok) {
    napi_value msg, error;
    napi_create_string_utf8(env, "udm_fileops: async work was cancelled", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &error);
    napi_reject_deferred(env, w->deferred, error);
  } else if (w->err) {
    napi_reject_deferred(env, w->deferred, make_errno_error(env, "copy_file_range", w->err));
  } else {
    napi_value done;
    napi_create_double(env, (double)w->done, &done);
    napi_resolve_deferred(env, w->deferred, done);
  }
  napi_delete_async_work(env, w->work);
  free(w);
}

static napi_value copy_range(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  int64_t fd_in, off_in, fd_out, off_out, length;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 5) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: expected (fdIn, offsetIn, fdOut, offsetOut, length)");
    return NULL;
  }
  if (!get_offset(env, argv, 0, "fdIn", &fd_in) || !get_offset(env, argv, 1, "offsetIn", &off_in) ||
      !get_offset(env, argv, 2, "fdOut", &fd_out) || !get_offset(env, argv, 3, "offsetOut", &off_out) ||
      !get_offset(env, argv, 4, "length", &length))
    return NULL;
  if (fd_in > INT32_MAX || fd_out > INT32_MAX) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: fd out of range");
    return NULL;
  }
  copy_work *w = calloc(1, sizeof *w);
  if (!w) {
    napi_throw_error(env, "ENOMEM", "udm_fileops: out of memory");
    return NULL;
  }
  w->fd_in = (int)fd_in;
  w->fd_out = (int)fd_out;
  w->off_in = off_in;
  w->off_out = off_out;
  w->length = length;
  return queue_promise_work(env, "udm_fileops.copyRange", copy_execute, copy_complete, w, &w->work, &w->deferred);
}

/*
 * preadNowait(fd, target, position): one preadv2(RWF_NOWAIT) into the whole of `target` (a
 * Uint8Array/Buffer; pass a subarray for part of one) on the calling (JS) thread. It copies only
 * what the page cache already holds and never sleeps on I/O: a short count means the rest is not
 * cached (or the file ends there), -1 means nothing at `position` is cached (EAGAIN; the kernel may
 * have started readahead). EAGAIN is a return value, not an exception, because it is the common
 * miss and building an Error costs more than the call. Other failures throw (EOPNOTSUPP where the
 * file system cannot do RWF_NOWAIT, e.g. tmpfs; ENOSYS/EOPNOTSUPP on kernels before 4.14).
 */
static napi_value pread_nowait(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], result;
  int fd;
  int64_t position;
  bool is_typedarray = false;
  napi_typedarray_type type;
  size_t length;
  void *data;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: expected (fd, target, position)");
    return NULL;
  }
  if (!get_fd(env, argv, &fd) || !get_offset(env, argv, 2, "position", &position)) return NULL;
  if (napi_is_typedarray(env, argv[1], &is_typedarray) != napi_ok || !is_typedarray ||
      napi_get_typedarray_info(env, argv[1], &type, &length, &data, NULL, NULL) != napi_ok ||
      type != napi_uint8_array) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: target must be a Buffer or Uint8Array");
    return NULL;
  }
  ssize_t n = 0;
  if (length > 0) {
    struct iovec iov = {data, length};
    do n = preadv2(fd, &iov, 1, (off_t)position, RWF_NOWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
      if (errno != EAGAIN) {
        napi_throw(env, make_errno_error(env, "preadv2(RWF_NOWAIT)", errno));
        return NULL;
      }
      n = -1;
    }
  }
  CHECK(napi_create_double(env, (double)n, &result));
  return result;
}

/* dropCache(fd, offset, length): posix_fadvise(POSIX_FADV_DONTNEED); length 0 means to the end. */
static napi_value drop_cache(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int fd;
  int64_t offset, length;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 3) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: expected (fd, offset, length)");
    return NULL;
  }
  if (!get_fd(env, argv, &fd) || !get_offset(env, argv, 1, "offset", &offset) ||
      !get_offset(env, argv, 2, "length", &length))
    return NULL;
  int err = posix_fadvise(fd, (off_t)offset, (off_t)length, POSIX_FADV_DONTNEED);
  if (err) {
    napi_throw(env, make_errno_error(env, "posix_fadvise(DONTNEED)", err));
    return NULL;
  }
  return NULL;
}

/* Reads argument i as a lock type: "read", "write" or "unlock". */
static int get_lock_type(napi_env env, napi_value *argv, size_t i, short *out) {
  char text[8];
  size_t length = 0;
  if (napi_get_value_string_utf8(env, argv[i], text, sizeof text, &length) == napi_ok) {
    if (strcmp(text, "read") == 0) *out = F_RDLCK;
    else if (strcmp(text, "write") == 0) *out = F_WRLCK;
    else if (strcmp(text, "unlock") == 0) *out = F_UNLCK;
    else length = 0;
    if (length) return 1;
  }
  napi_throw_type_error(env, "EINVAL", "udm_fileops: lock type must be \"read\", \"write\" or \"unlock\"");
  return 0;
}

/* Reads (fd, start, length, type) into an flock; returns 0 after throwing. */
static int get_lock_args(napi_env env, napi_callback_info info, int *fd, struct flock *fl) {
  size_t argc = 4;
  napi_value argv[4];
  int64_t start, length;
  short type;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: expected (fd, start, length, type)");
    return 0;
  }
  if (!get_fd(env, argv, fd) || !get_offset(env, argv, 1, "start", &start) ||
      !get_offset(env, argv, 2, "length", &length) || !get_lock_type(env, argv, 3, &type))
    return 0;
  memset(fl, 0, sizeof *fl);
  fl->l_type = type;
  fl->l_whence = SEEK_SET;
  fl->l_start = (off_t)start;
  fl->l_len = (off_t)length;
  return 1;
}

/* ofdLock(fd, start, length, type): takes, changes or drops an OFD lock without waiting. */
static napi_value ofd_lock(napi_env env, napi_callback_info info) {
  int fd;
  struct flock fl;
  if (!get_lock_args(env, info, &fd, &fl)) return NULL;
  int rc;
  do rc = fcntl(fd, F_OFD_SETLK, &fl);
  while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    /* POSIX allows EACCES for a conflict; Linux says EAGAIN: report one name. */
    napi_throw(env, make_errno_error(env, "fcntl(F_OFD_SETLK)", errno == EACCES ? EAGAIN : errno));
    return NULL;
  }
  return NULL;
}

/* notifySocket(path, message): sendto() of one datagram, as sd_notify(3) does with NOTIFY_SOCKET. */
static napi_value notify_socket(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  char path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
  char message[4096];
  size_t path_len, message_len;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2 ||
      napi_get_value_string_utf8(env, argv[0], path, sizeof path, &path_len) != napi_ok ||
      napi_get_value_string_utf8(env, argv[1], message, sizeof message, &message_len) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: expected (path, message) strings");
    return NULL;
  }
  struct sockaddr_un addr;
  memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (path_len == 0 || path_len >= sizeof addr.sun_path) {
    napi_throw(env, make_errno_error(env, "notifySocket", ENAMETOOLONG));
    return NULL;
  }
  memcpy(addr.sun_path, path, path_len);
  if (path[0] == '@') addr.sun_path[0] = 0; /* abstract namespace */
  socklen_t addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    napi_throw(env, make_errno_error(env, "socket(AF_UNIX)", errno));
    return NULL;
  }
  ssize_t sent = sendto(fd, message, message_len, MSG_NOSIGNAL, (struct sockaddr *)&addr, addr_len);
  int err = errno;
  close(fd);
  if (sent < 0) {
    napi_throw(env, make_errno_error(env, "sendto(NOTIFY_SOCKET)", err));
    return NULL;
  }
  return NULL;
}

/* ofdTest(fd, start, length, type): the first lock that would conflict with taking `type`, or null. */
static napi_value ofd_test(napi_env env, napi_callback_info info) {
  int fd;
  struct flock fl;
  napi_value result, value;
  if (!get_lock_args(env, info, &fd, &fl)) return NULL;
  if (fl.l_type == F_UNLCK) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: ofdTest needs type \"read\" or \"write\"");
    return NULL;
  }
  fl.l_pid = 0; /* F_OFD_GETLK requires l_pid == 0 */
  if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
    napi_throw(env, make_errno_error(env, "fcntl(F_OFD_GETLK)", errno));
    return NULL;
  }
  if (fl.l_type == F_UNLCK) {
    CHECK(napi_get_null(env, &result));
    return result;
  }
  CHECK(napi_create_object(env, &result));
  CHECK(napi_create_string_utf8(env, fl.l_type == F_WRLCK ? "write" : "read", NAPI_AUTO_LENGTH, &value));
  CHECK(napi_set_named_property(env, result, "type", value));
  CHECK(napi_create_double(env, (double)fl.l_start, &value));
  CHECK(napi_set_named_property(env, result, "start", value));
  CHECK(napi_create_double(env, (double)fl.l_len, &value));
  CHECK(napi_set_named_property(env, result, "length", value));
  CHECK(napi_create_int32(env, fl.l_pid, &value));
  CHECK(napi_set_named_property(env, result, "pid", value));
  return result;
}

/*
 * tuneMalloc(trimThreshold, mmapThreshold): mallopt(M_TRIM_THRESHOLD) and mallopt(M_MMAP_THRESHOLD)
 * of glibc, so freed data-path buffers (socket chunks, payloads) stay in the heap for the next
 * request instead of going back to the kernel and faulting in again. True when both were taken.
 */
static napi_value tune_malloc(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], result;
  int64_t trim, mmap_threshold;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 2) {
    napi_throw_type_error(env, "EINVAL", "udm_fileops: expected (trimThreshold, mmapThreshold)");
    return NULL;
  }
  if (!get_offset(env, argv, 0, "trimThreshold", &trim) ||
      !get_offset(env, argv, 1, "mmapThreshold", &mmap_threshold))
    return NULL;
  if (trim > INT32_MAX || mmap_threshold > INT32_MAX) {
    napi_throw_range_error(env, "EINVAL", "udm_fileops: malloc thresholds must be below 2 GiB");
    return NULL;
  }
  int ok = mallopt(M_TRIM_THRESHOLD, (int)trim) == 1 && mallopt(M_MMAP_THRESHOLD, (int)mmap_threshold) == 1;
  CHECK(napi_get_boolean(env, ok, &result));
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_enumerable, NULL},
      {"copyRange", NULL, copy_range, NULL, NULL, NULL, napi_enumerable, NULL},
      {"preadNowait", NULL, pread_nowait, NULL, NULL, NULL, napi_enumerable, NULL},
      {"dropCache", NULL, drop_cache, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdLock", NULL, ofd_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdTest", NULL, ofd_test, NULL, NULL, NULL, napi_enumerable, NULL},
      {"notifySocket", NULL, notify_socket, NULL, NULL, NULL, napi_enumerable, NULL},
      {"tuneMalloc", NULL, tune_malloc, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
