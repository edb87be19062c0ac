//! CUDA device discovery with cudarc (feature `cuda`).
//!
//! cudarc is built with `dynamic-loading`: libcuda is opened at run time, so a build with this
//! feature needs no CUDA toolkit, and a machine without the driver just reports no GPU.

// The one unsafe call here is `is_culib_present`, see the SAFETY comment at its use.
#![allow(unsafe_code)]

use cudarc::driver::{CudaContext, DriverError, sys};

use crate::Device;

const MIB: usize = 1024 * 1024;

/// The CUDA devices of this machine, in ordinal order. Empty when the driver library is missing,
/// when there is no GPU, or on any error (or panic) from the driver.
pub(crate) fn discover() -> Vec<Device> {
    match std::panic::catch_unwind(probe) {
        Ok(Ok(devices)) => devices,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "CUDA device discovery failed");
            Vec::new()
        }
        Err(_) => {
            tracing::debug!("CUDA device discovery panicked");
            Vec::new()
        }
    }
}

fn probe() -> Result<Vec<Device>, DriverError> {
    // SAFETY: `is_culib_present` only tries to open libcuda (`libloading::Library::new` on the
    // usual names) and closes it again; it resolves and calls no symbol from it. It must come
    // first: without the library every driver call below panics instead of returning an error.
    if !unsafe { sys::is_culib_present() } {
        tracing::debug!("libcuda not found; no CUDA devices");
        return Ok(Vec::new());
    }
    let count = usize::try_from(CudaContext::device_count()?).unwrap_or(0);
    let mut devices = Vec::with_capacity(count);
    for ordinal in 0..count {
        let ctx = CudaContext::new(ordinal)?;
        let total_mib = u64::try_from(ctx.total_mem()? / MIB).unwrap_or(u64::MAX);
        devices.push(Device::Cuda {
            ordinal,
            name: ctx.name()?,
            total_mib,
        });
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use crate::Device;

    #[test]
    fn discovery_does_not_panic() {
        // Without libcuda (or without a GPU) this is empty; with GPUs, one entry per ordinal.
        let devices = super::discover();
        for (i, device) in devices.iter().enumerate() {
            assert!(
                matches!(device, Device::Cuda { ordinal, name, .. } if *ordinal == i && !name.is_empty()),
                "unexpected entry {device:?}"
            );
        }
        // Twice in a row gives the same answer (nothing left half-initialised).
        assert_eq!(super::discover(), devices);
    }

    #[test]
    fn discover_lists_the_cpu_first() {
        let devices = crate::discover();
        assert!(matches!(devices[0], Device::Cpu { cores } if cores >= 1));
        assert!(
            devices[1..]
                .iter()
                .all(|d| matches!(d, Device::Cuda { .. }))
        );
    }
}
