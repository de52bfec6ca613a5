import ArgumentParser
import GMemBackend
import GMemModel
import GMemScenario

#if canImport(Glibc)
import Glibc
#endif

struct Fuzz: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Random differential testing: random op sequences, model against kernel, every divergence minimized.",
        discussion: """
            Each sequence is generated from its seed (printed with every finding) over 1-3 VMs, \
            guest_memfds, memfds, mappings, memslots, vCPUs, guest and host accesses, with sizes \
            and offsets at the kernel's boundaries. With --backend both every step runs on the \
            model and on this host's kernel and any difference in errno, bytes, value or exit is \
            a divergence; with --backend model every step is checked against the invariants \
            (and a trap would name the seed). Each finding is shrunk to the shortest scenario \
            file that still shows it and written to --out. Exit status: 0 nothing found, 1 a \
            finding, 3 the backend is unavailable.
            """)

    @OptionGroup var options: BackendOptions

    @Option(help: "The campaign's seed (sequence i uses a seed derived from it and i).")
    var seed: UInt64 = 1

    @Option(help: "How many sequences to run.")
    var count: Int = 1000

    @Option(help: "Steps per sequence.")
    var steps: Int = 30

    @Option(name: .customLong("time-limit"), help: "Stop after this many seconds, whatever --count says.")
    var timeLimit: Double?

    @Flag(help: "A progress line on standard error every second.")
    var progress = false

    @Option(help: "Where minimized reproducers are written (one scenario file per distinct finding).")
    var out: String = "fuzz-findings"

    @Option(name: .customLong("sequence"), help: "Run only the sequence with this seed (as a finding prints it), then stop.")
    var only: UInt64?

    @Flag(name: .customLong("print"), help: "With --sequence: print the sequence as a scenario file instead of running it.")
    var printOnly = false

    func validate() throws {
        if options.backend == .kernel {
            throw ValidationError("--backend kernel has nothing to compare against: use both (model against kernel) or model")
        }
        guard count >= 0, steps > 0, steps <= 10_000 else { throw ValidationError("--count must be >= 0 and --steps in 1...10000") }
    }

    func run() throws {
        let probe = try options.makeBackends()
        let scope = FuzzScope.common(to: probe)
        let campaign = FuzzCampaign { () throws(BackendError) -> [any Backend] in
            do { return try options.makeBackends() } catch { throw .unsupported("\(error)") }
        }
        if printOnly, let only {
            let sequence = FuzzGenerator.sequence(seed: only, steps: steps, scope: scope)
            let top = JSON.object(JSONObject(["name": .string("fuzz-\(only)"), "steps": .array(sequence)]))
            print(render(top), terminator: "")
            return
        }
        let start = monotonicSeconds()
        var lastProgress = start
        var sequences = 0
        var findings: [String: (FuzzFinding, UInt64, Int)] = [:]
        var order: [String] = []
        var known: [String: Int] = [:]
        let total = only == nil ? count : 1
        emit("gmem fuzz: \(probe.map(\.name).joined(separator: " against ")), campaign seed \(seed), \(total) sequences of \(steps) steps")
        for i in 0..<total {
            if let limit = timeLimit, monotonicSeconds() - start > limit { break }
            let s = only ?? FuzzRNG.sequenceSeed(campaign: seed, index: i)
            CrashNote.set("gmem fuzz: trapped in sequence \(s); reproduce with: gmem fuzz --backend \(options.backend.rawValue) --sequence \(s) --steps \(steps)\n")
            let sequence = FuzzGenerator.sequence(seed: s, steps: steps, scope: scope)
            sequences += 1
            if let f = try campaign.run(sequence) {
                if let why = f.known {
                    if known[f.signature] == nil { emit("KNOWN \(f.signature) (sequence \(s)): \(why)") }
                    known[f.signature, default: 0] += 1
                } else if findings[f.signature] == nil {
                    let small = campaign.minimize(f)
                    findings[f.signature] = (small, s, 1)
                    order.append(f.signature)
                    report(small, seed: s)
                } else {
                    findings[f.signature]!.2 += 1
                }
            }
            if progress, monotonicSeconds() - lastProgress >= 1 {
                lastProgress = monotonicSeconds()
                emitError("  \(sequences) sequences, \(campaign.stepsCompared) steps, \(findings.count) distinct findings, \(Int(lastProgress - start)) s")
            }
        }
        CrashNote.set("")
        let n = findings.values.reduce(0) { $0 + $1.2 }
        let what = probe.count == 2 ? "divergent" : "with a violation"
        if !order.isEmpty {
            emit("distinct findings (how often each was hit):")
            for sig in order { emit("  \(findings[sig]!.2)x \(sig)") }
        }
        let tenths = Int(((monotonicSeconds() - start) * 10).rounded())
        if !campaign.skipReasons.isEmpty {
            emit("why steps were skipped (most common first):")
            for (why, n) in campaign.skipReasons.sorted(by: { $0.value > $1.value }).prefix(8) { emit("  \(n)x \(why)") }
        }
        if !known.isEmpty {
            emit("known kernel hazards, not counted (docs/fuzzing.md): " + known.map { "\($0.value)x \($0.key)" }.sorted().joined(separator: "; "))
        }
        emit("\(sequences) sequences, \(campaign.stepsCompared) steps compared, \(campaign.stepsSkipped) skipped, \(n) \(what) (\(findings.count) distinct) in \(tenths / 10).\(tenths % 10) s")
        if !findings.isEmpty { throw ExitCode(1) }
    }

    /// Prints a finding and writes its reproducer.
    func report(_ f: FuzzFinding, seed s: UInt64) {
        let slug = f.signature.lowercased().map { $0.isLetter || $0.isNumber ? $0 : "-" }
            .reduce(into: "") { acc, c in if !(c == "-" && acc.hasSuffix("-")) { acc.append(c) } }
        var stem = Substring(slug.prefix(80))
        while stem.hasPrefix("-") { stem = stem.dropFirst() }
        while stem.hasSuffix("-") { stem = stem.dropLast() }
        let path = "\(out)/\(stem).json"
        let description = f.kind == .divergence
            ? "gmem fuzz found this divergence (sequence \(s)): step \(f.step) (\(f.op)): model \(f.first); kernel \(f.second)."
            : "gmem fuzz found this violation (sequence \(s)): step \(f.step) (\(f.op)): \(f.first)."
        let name = "fuzz-" + String(slug.prefix(60))
        let text = render(f.scenario(name: name, description: description))
        _ = mkdir(out, 0o755)
        let written = writeTextFile(path, text)
        emit("\(f.kind == .divergence ? "DIVERGENCE" : "VIOLATION") \(f.signature)")
        emit("  sequence \(s), step \(f.step) of \(f.steps.count) after shrinking: \(f.op)")
        if f.kind == .divergence {
            emit("  model:  \(f.first)")
            emit("  kernel: \(f.second)")
        } else {
            emit("  \(f.first)")
        }
        emit(written ? "  reproducer: \(path)" : "  (could not write \(path))")
    }

    /// A scenario file, one step per line, as the corpus is written.
    func render(_ scenario: JSON) -> String {
        guard case .object(let o) = scenario, case .array(let steps)? = o["steps"] else { return scenario.rendered }
        var text = "{\n"
        for k in o.keys where k != "steps" { text += "  \(JSON.string(k).rendered): \(o[k]!.rendered),\n" }
        text += "  \"steps\": [\n"
        text += steps.map { "    " + $0.rendered }.joined(separator: ",\n")
        text += "\n  ]\n}\n"
        return text
    }
}

/// A line written to standard error if the process traps (SIGILL, SIGTRAP, SIGABRT)
/// while a sequence runs, naming the sequence, so no trap goes unreproducible.
enum CrashNote {
    nonisolated(unsafe) static var buffer = UnsafeMutablePointer<CChar>.allocate(capacity: 512)
    nonisolated(unsafe) static var installed = false

    static func set(_ text: String) {
        let bytes = Array(text.utf8.prefix(511))
        for (i, b) in bytes.enumerated() { buffer[i] = CChar(bitPattern: b) }
        buffer[bytes.count] = 0
        if !installed {
            installed = true
            for sig in [SIGILL, SIGTRAP, SIGABRT] {
                signal(sig) { signo in
                    _ = Glibc.write(2, CrashNote.buffer, strlen(CrashNote.buffer))
                    signal(signo, SIG_DFL)
                    raise(signo)
                }
            }
        }
    }
}

/// Writes `text` to `path` (fopen/fwrite); false if it could not.
func writeTextFile(_ path: String, _ text: String) -> Bool {
    guard let f = fopen(path, "wb") else { return false }
    defer { fclose(f) }
    let bytes = Array(text.utf8)
    return fwrite(bytes, 1, bytes.count, f) == bytes.count
}
