// Prints the partition the Java Kafka client's default partitioner picks for each key:
// toPositive(murmur2(utf8(key))) % partitions. Run as a single-file source program:
//   java -cp '<kafka libs>/*' Murmur2Partition.java PARTITIONS KEY...
import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.utils.Utils;

public class Murmur2Partition {
    public static void main(String[] args) {
        int partitions = Integer.parseInt(args[0]);
        for (int i = 1; i < args.length; i++) {
            byte[] key = args[i].getBytes(StandardCharsets.UTF_8);
            System.out.println(Utils.toPositive(Utils.murmur2(key)) % partitions);
        }
    }
}
