# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if header :contains :comparator "i;octet" "subject" "REPORT" {
  fileinto "yes";
} else {
  fileinto "no";
}
