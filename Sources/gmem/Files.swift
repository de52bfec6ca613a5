#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads a whole file as UTF-8 text (fopen/fread), or says why not.
func readTextFile(_ path: String) -> Result<String, FileProblem> {
    guard let f = fopen(path, "rb") else {
        return .failure(FileProblem(message: String(cString: strerror(errno))))
    }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = fread(&chunk, 1, chunk.count, f)
        if n > 0 { bytes.append(contentsOf: chunk[0..<n]) }
        if n < chunk.count {
            if ferror(f) != 0 { return .failure(FileProblem(message: "read error")) }
            break
        }
    }
    guard let text = String(validating: bytes, as: UTF8.self) else {
        return .failure(FileProblem(message: "not UTF-8 text"))
    }
    return .success(text)
}

struct FileProblem: Error { var message: String }

/// Expands a directory argument to the *.json files in it, sorted; files pass through.
func expandScenarioPaths(_ paths: [String]) -> [String] {
    var out: [String] = []
    for p in paths {
        guard let dir = opendir(p) else {
            out.append(p)
            continue
        }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name.hasSuffix(".json") { names.append(name) }
        }
        closedir(dir)
        let base = p.hasSuffix("/") ? p : p + "/"
        out.append(contentsOf: names.sorted().map { base + $0 })
    }
    return out
}

/// Writes to standard output and flushes, so output interleaves sanely with stderr.
func emit(_ line: String) {
    print(line)
    fflush(nil)
}

func emitError(_ line: String) {
    fflush(nil)
    let text = line + "\n"
    _ = text.withCString { Glibc.write(2, $0, strlen($0)) }
}

/// Seconds on CLOCK_MONOTONIC (clock_gettime), for timings the commands print.
func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
