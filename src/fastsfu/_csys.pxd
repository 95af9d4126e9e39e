# C declarations the datapath needs from the system: batched UDP I/O and addresses.
# recvmmsg/sendmmsg are GNU extensions; pyconfig.h defines _GNU_SOURCE before any system header.

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from posix.time cimport timespec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    struct iovec:
        void *iov_base
        size_t iov_len

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    int AF_UNSPEC
    int AF_INET
    int AF_INET6
    int SOL_SOCKET
    int SO_TIMESTAMPNS
    int SCM_TIMESTAMPNS
    int MSG_DONTWAIT
    int MSG_TRUNC
    int MSG_CTRUNC
    int MSG_NOSIGNAL

    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, timespec *timeout)
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
    int connect(int fd, const sockaddr *addr, socklen_t addrlen)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)

    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        uint8_t s6_addr[16]

    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    int INET6_ADDRSTRLEN


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int EPOLLIN
    int EPOLLOUT
    int EPOLLHUP
    int EPOLLERR
    int EPOLL_CTL_MOD
    int EPOLL_CLOEXEC
    int EPOLL_CTL_ADD
    int EPOLL_CTL_DEL
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)


cdef extern from "<sys/eventfd.h>" nogil:
    int EFD_NONBLOCK
    int EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int PTHREAD_MUTEX_RECURSIVE
    int pthread_mutexattr_init(pthread_mutexattr_t *attr)
    int pthread_mutexattr_settype(pthread_mutexattr_t *attr, int kind)
    int pthread_mutexattr_destroy(pthread_mutexattr_t *attr)
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_trylock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)


# Atomics (GCC/Clang builtins) for the few words the datapath thread and the event loop share
# outside the table mutex; sequentially consistent, so that "publish, then check the flag" on one
# side and "clear the flag, then read" on the other cannot both miss (no lost wake-up).
cdef extern from *:
    """
    static inline int fsfu_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void fsfu_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int fsfu_xchg_int(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int fsfu_add_int(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST); }
    static inline uint32_t fsfu_load_u32(uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void fsfu_store_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    """
    int fsfu_load_int(int *p) nogil
    void fsfu_store_int(int *p, int v) nogil
    int fsfu_xchg_int(int *p, int v) nogil
    int fsfu_add_int(int *p, int v) nogil
    uint32_t fsfu_load_u32(uint32_t *p) nogil
    void fsfu_store_u32(uint32_t *p, uint32_t v) nogil
