"""Texts and values the fake reproduces from the real tools (recordings, script defaults).

What is here is long (stack traces, mkfs's closing text) or printed by several commands; a
message printed in one place stays inline where it is printed. A new set of recorded texts
(another command's, a gateway's) goes here under a heading naming the transcripts it comes
from.
"""

from __future__ import annotations

# -- configuration and storage as mkfs leaves them (layouts/; the meta-info is a stand-in)

CREATOR_VERSION = "143"
MASTER_REPLICA_TEXT = "This file marks the repository as replicatable to stratum 1 servers\n"

SPOOL_DIRS = (
    "cache",
    "ofs_workdir/work",
    "ovl_work",
    "rdonly",
    "scratch/current",
    "scratch/wastebin",
    "tmp",
)

META_INFO_TEXT = (
    "{\n"
    '  "administrator" : "Your Name",\n'
    '  "email"         : "you@example.org",\n'
    '  "organisation"  : "Your Organisation",\n'
    '  "description"   : "Repository content",\n'
    '  "url"           : "https://example.org",\n'
    '  "recommended-stratum0":  "http://stratum0.example.org/cvmfs/<repo>",\n'
    '  "recommended-stratum1s" : []\n'
    "}\n"
)

# -- garbage collection: cvmfs_server's defaults, ``last_gc`` as ``date --utc`` writes it

GC_DEFAULT_TIMESPAN = 3 * 86400
AUTO_GC_DEFAULT_LAPSE = "1 day ago"
AUTO_GC_DEFAULT_TIMESPAN = "3 days ago"
LAST_GC_FORMAT = "%a %b %e %H:%M:%S UTC %Y"

# -- output: the rdonly mount, stack traces, mkfs's closing text, publish's first steps

FUSE_CHATTER = (
    "CernVM-FS: running with suid support\n"
    "Failed to set requested number of open files, using maximum number 20000\n"
    "CernVM-FS: loading Fuse module... done\n"
    "CernVM-FS: mounted cvmfs on {rdonly}\n"
)

SOURCE_PLACEHOLDER = "<cvmfs-src>"

TRACE_REPOSITORY = (
    "\n"
    "Stacktrace:\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xdb4ae) [0x7f0000adb4ae]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xe4fcb) [0x7f0000ae4fcb]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0x2c409) [0x7f0000a2c409]\n"
    "/lib/libcvmfs_server.so.2.12.0(_ZN7publish10RepositoryC2ERKNS_18SettingsRepositoryEb"
    "+0x65e) [0x7f0000ae210e]\n"
    "/usr/bin/cvmfs_publish(+0x61bca) [0x550000032bca]\n"
    "/usr/bin/cvmfs_publish(+0x1a9b4) [0x55000000b9b4]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(+0x2724a) [0x7f000004524a]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(__libc_start_main+0x85) [0x7f0000045305]\n"
    "/usr/bin/cvmfs_publish(+0x1aaa1) [0x55000000baa1]\n"
    "\n"
)

TRACE_PUBLISHER = (
    "\n"
    "Stacktrace:\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xdb4ae) [0x7f0000adb4ae]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xe4fcb) [0x7f0000ae4fcb]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0x2c409) [0x7f0000a2c409]\n"
    "/lib/libcvmfs_server.so.2.12.0(_ZN7publish10RepositoryC2ERKNS_18SettingsRepositoryEb"
    "+0x65e) [0x7f0000ae210e]\n"
    "/lib/libcvmfs_server.so.2.12.0(_ZN7publish9PublisherC1ERKNS_17SettingsPublisherEb"
    "+0x48) [0x7f0000ae2378]\n"
    "/usr/bin/cvmfs_publish(+0x4b11a) [0x55000000011a]\n"
    "/usr/bin/cvmfs_publish(+0x1a9b4) [0x55000000b9b4]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(+0x2724a) [0x7f000004524a]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(__libc_start_main+0x85) [0x7f0000045305]\n"
    "/usr/bin/cvmfs_publish(+0x1aaa1) [0x55000000baa1]\n"
    "\n"
)

TRACE_TRANSACTION = (
    "\n"
    "Stacktrace:\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xdb4ae) [0x7f0000adb4ae]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0xe4fcb) [0x7f0000ae4fcb]\n"
    "/lib/libcvmfs_server.so.2.12.0(+0x305d1) [0x7f00004305d1]\n"
    "/lib/libcvmfs_server.so.2.12.0(_ZN7publish9Publisher11TransactionEv+0x11) "
    "[0x7f00004e10a1]\n"
    "/usr/bin/cvmfs_publish(+0x6b629) [0x55000006e629]\n"
    "/usr/bin/cvmfs_publish(+0x1a9b4) [0x55000001d9b4]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(+0x2724a) [0x7f000004524a]\n"
    "/lib/x86_64-linux-gnu/libc.so.6(__libc_start_main+0x85) [0x7f0000045305]\n"
    "/usr/bin/cvmfs_publish(+0x1aaa1) [0x55000001daa1]\n"
    "\n"
)

MKFS_TAIL = (
    "\n"
    "Before you can install anything, call `cvmfs_server transaction`\n"
    "to enable write access on your repository. Then install your\n"
    "software in {union} as user {user}.\n"
    "Once you're happy, publish using `cvmfs_server publish`\n"
    "\n"
    "For client configuration, have a look at 'cvmfs_server info'\n"
    "\n"
    "If you go for production, backup your masterkey from {keys}/!\n"
)

PUBLISH_STEPS_BEFORE_UPLOAD = (
    "Swissknife Sync: Processing changes...\n",
    "Waiting for upload of files before committing...\n",
)

# -- ingest (m_ingest, m2_ingest; gateway.md surprises 22-29)

# every ingest on a host whose /bin/sh is dash (m_ingest 3…, m2_ingest 2…)
INGEST_EVAL_NOT_FOUND = "/usr/bin/cvmfs_server: 9263: eval: [[: not found\n"

# the source directory as the m2_ingest recording writes it in PANIC messages
INGEST_SOURCE_PLACEHOLDER = "<src>"

INGEST_MISSING_PARAMETERS = (
    "Please provide some parameters, use -t $TAR_FILE to provide the tar to extract -b "
    "$BASE_DIR to provide where to extract the tar and -d $TO_DELETE to provide what to "
    "delete from the repository\n"
)
