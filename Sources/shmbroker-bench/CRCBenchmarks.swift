import Foundation
import Glibc
import ShmBrokerClient
import ShmBrokerCore
import ShmBrokerPlatform
import ShmBrokerProtocol
import SystemPackage

/// The CRC-64 paths against liblzma and isa-l, and the verified read against memcpy.
extension Run {
    // MARK: CRC and verified reads

    func crcBenchmark(_ report: inout Report) -> [String: CRCRow] {
        let paths = CRC64.supportedPaths
        report.section("CRC-64/XZ throughput (GB/s, median of \(repetitions)); active path \(CRC64.activePath)")
        report.row(["size"] + paths.map(\.description) + ["liblzma", "isa-l", "active/liblzma", "active/isa-l"])
        var rows: [String: CRCRow] = [:]
        for size in [4 << 10, 1 << 20, 16 << 20] {
            let data = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
            var sink: UInt64 = 0
            let inner = max(4, (64 << 20) / size)
            var perPath: [String: Double] = [:]
            for path in paths {
                perPath[path.description] = data.withUnsafeBytes { bytes in
                    let runs = path == .portable ? max(3, repetitions / 3) : repetitions
                    let count = path == .portable ? 1 : inner
                    return medianThroughput(bytes: size * count, runs: runs) {
                        for _ in 0..<count { sink ^= CRC64.checksum(bytes, path: path) }
                    }
                }
            }
            let expected = CRC64.checksum(data)
            func external(_ function: CRCBaseline.Function?, _ name: String) -> Double {
                guard let function else { return .nan }
                precondition(data.withUnsafeBufferPointer { function($0.baseAddress, size) } == expected, "CRC disagrees with \(name)")
                return data.withUnsafeBufferPointer { buffer in
                    medianThroughput(bytes: size * inner, runs: repetitions) {
                        for _ in 0..<inner { sink ^= function(buffer.baseAddress, size) }
                    }
                }
            }
            let lzma = external(CRCBaseline.liblzma, "liblzma")
            let isal = external(CRCBaseline.isal, "isa-l")
            // The goal compares the active path with isa-l in back-to-back pairs: the columns above
            // run one implementation after another, so a burst of noise can hit only one of them.
            let paired = CRCBaseline.isal.map { isalFunction in
                data.withUnsafeBufferPointer { buffer in
                    medianPairedRatio(runs: repetitions, {
                        for _ in 0..<inner { sink ^= CRC64.checksum(UnsafeRawBufferPointer(buffer)) }
                    }, over: {
                        for _ in 0..<inner { sink ^= isalFunction(buffer.baseAddress, size) }
                    })
                }
            } ?? .nan
            if sink == 42 { print("") }
            let ours = perPath[CRC64.activePath.description] ?? .nan
            rows[sizeName(size)] = CRCRow(paths: perPath.mapValues(Measured.init), active: CRC64.activePath.description,
                                          shmbroker: Measured(ours), portable: Measured(perPath["portable"] ?? .nan),
                                          liblzma: Measured(lzma), isal: Measured(isal), overLiblzma: Measured(ours / lzma),
                                          overIsal: Measured(ours / isal), overIsalPaired: Measured(paired))
            report.row([sizeName(size)] + paths.map { fmt(perPath[$0.description] ?? .nan) }
                       + [fmt(lzma), fmt(isal), ratioCell(ours / lzma), ratioCell(ours / isal)])
            if size == 1 << 20 { report.goal("CRC-64 >= 1.5x liblzma at 1 MiB", value: ours / lzma, target: 1.5) }
            if !paired.isNaN { report.note("active/isa-l in \(repetitions) back-to-back pairs (median): \(fmt(paired))x") }
            report.goal("CRC-64 >= 0.8x isa-l crc64_ecma_refl at \(sizeName(size))", value: paired, target: 0.8)
        }
        if CRCBaseline.isal == nil { report.note("isa-l not found (apt-get install libisal2): its column is n/a") }
        return rows
    }

    func verifiedReadBenchmark(_ report: inout Report) -> [String: VerifiedReadRow] {
        report.section("Verified read (copy-out + CRC check) vs memcpy (GB/s)")
        report.row(["size", "verified read", "memcpy", "ratio"])
        var rows: [String: VerifiedReadRow] = [:]
        for size in [64, 4 << 10, 64 << 10, 1 << 20, 16 << 20] {
            let layout = SegmentLayout(capacity: size, slotCount: 2)
            guard let file = try? MemoryFile.create(name: "bench", size: layout.totalSize),
                  let region = try? MappedRegion(mapping: file, length: layout.totalSize, writable: true) else { continue }
            defer { file.closeQuietly() }
            let writer = SegmentWriter(formatting: region, layout: layout, name: "bench")
            _ = try? writer.publish((0..<size).map { UInt8(truncatingIfNeeded: $0) })
            guard let reader = try? SegmentReader(region: region) else { continue }
            let source = (0..<size).map { UInt8(truncatingIfNeeded: $0) }
            var destination = [UInt8](repeating: 0, count: size)
            let inner = max(1, (8 << 20) / size)
            let verified = destination.withUnsafeMutableBytes { buffer in
                medianThroughput(bytes: size * inner, runs: repetitions) {
                    for _ in 0..<inner { _ = try? reader.readOnce(into: buffer) }
                }
            }
            let memcpyRate = destination.withUnsafeMutableBytes { buffer in
                source.withUnsafeBytes { from in
                    medianThroughput(bytes: size * inner, runs: repetitions) {
                        for _ in 0..<inner { memcpy(buffer.baseAddress!, from.baseAddress!, size) }
                    }
                }
            }
            rows[sizeName(size)] = VerifiedReadRow(verified: Measured(verified), memcpy: Measured(memcpyRate), ratio: Measured(verified / memcpyRate))
            report.row([sizeName(size), fmt(verified), fmt(memcpyRate), fmt(verified / memcpyRate) + "x"])
            if size == 1 << 20 { report.goal("verified read >= 0.45x memcpy at 1 MiB", value: verified / memcpyRate, target: 0.45) }
            if size == 16 << 20 { report.goal("verified read >= 0.8x memcpy at 16 MiB", value: verified / memcpyRate, target: 0.8) }
        }
        return rows
    }
}
