# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if header :is :comparator "i;octet" "subject" "weekly report [urgent] *important*" {
  fileinto "yes";
} else {
  fileinto "no";
}
