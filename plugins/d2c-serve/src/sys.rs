//! The plugin's only `unsafe`: two Linux process-control calls that std does not offer.
//! Everything here is wrapped in safe functions; no other module touches `libc`.

use std::io;
use std::process::Command;

/// Asks the kernel to SIGKILL the child when this process dies, however it dies (SIGKILL,
/// panic=abort, OOM killer): the graceful stop path cannot run then, and an orphaned
/// llama-server would hold its port and memory forever.
///
/// The signal is tied to the spawning *thread*, so the caller must spawn from a thread that
/// lives as long as the process.
#[cfg(target_os = "linux")]
pub fn kill_child_when_parent_dies(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook runs in the forked child before exec; it calls only async-signal-safe
    // functions (prctl, getppid) and builds errors without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then no signal will ever come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub fn kill_child_when_parent_dies(_cmd: &mut Command) {}

#[derive(Debug, Clone, Copy)]
pub enum Signal {
    Terminate,
    Kill,
}

/// Sends `signal` to every process of the group `pgid` (the child was made a group leader),
/// so helpers the child forked go too. A group that no longer exists is not an error.
pub fn signal_process_group(pgid: u32, signal: Signal) -> io::Result<()> {
    let sig = match signal {
        Signal::Terminate => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    if pgid <= 1 {
        // kill(-1) or kill(0) would signal far more than our child.
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(-pgid, sig) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}
