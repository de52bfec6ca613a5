import ArgumentParser

#if canImport(Glibc)
import Glibc
#endif

/// `--on linux-6.12`: the same command, run inside a reference kernel booted under
/// qemu (scripts/reference-kernel run), its output shown here and its exit status
/// returned. The guest gets this very binary, its libraries and the files named.
enum ReferenceKernel {
    static let versions = ["linux-6.12"]

    /// This process's arguments without `--on VERSION` (or `--on=VERSION`).
    static func argumentsWithoutOn() -> [String] {
        var out: [String] = []
        var skip = false
        for a in CommandLine.arguments.dropFirst() {
            if skip { skip = false; continue }
            if a == "--on" { skip = true; continue }
            if a.hasPrefix("--on=") { continue }
            out.append(a)
        }
        return out
    }

    /// scripts/reference-kernel, looked for from the working directory up (or
    /// GMEM_REFERENCE_SCRIPT).
    static func script() -> String? {
        if let p = getenv("GMEM_REFERENCE_SCRIPT") { return String(cString: p) }
        var dir = currentDirectory()
        while true {
            let candidate = dir + "/scripts/reference-kernel"
            if access(candidate, X_OK) == 0 { return candidate }
            guard let slash = dir.lastIndex(of: "/"), dir != "/" else { return nil }
            dir = slash == dir.startIndex ? "/" : String(dir[..<slash])
        }
    }

    static func currentDirectory() -> String {
        var buf = [CChar](repeating: 0, count: 4096)
        return getcwd(&buf, buf.count) != nil ? String(cString: buf) : "."
    }

    /// readlink(2) of /proc/self/exe: the binary the guest runs.
    static func ownBinary() -> String? {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        return n > 0 ? String(cString: buf) : nil
    }

    /// Runs the command inside `version` and exits with its status (3: not possible).
    static func relay(_ version: String) throws -> Never {
        guard versions.contains(version) else {
            emitError("gmem: --on: unknown reference kernel '\(version)' (known: \(versions.joined(separator: ", ")))")
            throw ExitCode(2)
        }
        guard let script = script(), let binary = ownBinary() else {
            emitError("gmem: --on \(version) needs scripts/reference-kernel (run gmem from the repository, or set GMEM_REFERENCE_SCRIPT)")
            throw ExitCode(3)
        }
        let argv = ["/bin/bash", script, "run", version, binary] + argumentsWithoutOn()
        var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for p in cArgs { free(p) } }
        fflush(nil)
        var pid: pid_t = 0
        guard posix_spawn(&pid, "/bin/bash", nil, nil, &cArgs, environ) == 0 else {
            emitError("gmem: could not start \(script)")
            throw ExitCode(3)
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let exited = status & 0x7f == 0
        throw ExitCode(exited ? (status >> 8) & 0xff : 3)
    }
}
