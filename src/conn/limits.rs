//! The process's file-descriptor budget. At start the soft limit is raised to the hard one
//! (as nginx's `worker_rlimit_nofile` would be set by hand), and `server.max_connections`, when
//! not configured, is derived from it: half of what is left after a reserve, since each client
//! connection may hold an origin connection too.

/// Descriptors kept for everything that is not a client or origin connection: listeners, the
/// admin service's connections, cache files, logs, health checks.
pub const RESERVED_FDS: u64 = 256;

/// Raise the soft `RLIMIT_NOFILE` to the hard limit; the soft limit in effect afterwards.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// `server.max_connections` when the config leaves it out.
pub fn default_max_connections(nofile: u64) -> usize {
    (nofile.saturating_sub(RESERVED_FDS) / 2).clamp(16, 1 << 20) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_leaves_a_reserve_and_room_for_origin_connections() {
        assert_eq!(default_max_connections(20_000), 9_872);
        assert_eq!(default_max_connections(1_024), 384);
        assert_eq!(default_max_connections(100), 16);
        assert_eq!(default_max_connections(u64::MAX), 1 << 20);
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let before = {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: as above.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
            l.rlim_cur
        };
        let after = raise_nofile_limit().expect("getrlimit");
        assert!(after >= before);
    }
}
